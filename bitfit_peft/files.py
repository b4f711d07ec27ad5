"""Adapter files on disk, treated as untrusted input: a strict safetensors reader and the checks that run before
anything touches a model.

`read_safetensors` parses the format itself (an 8-byte header length, a JSON header, then the data) so that every
way a file can lie is refused with one clear line before any tensor is built: a header length beyond the file,
duplicate or path-like keys, unknown dtypes, shapes that disagree with the byte ranges, overlapping or out-of-file
ranges. Pickle files (`adapter_model.bin`) are never read unless the caller opts in, and NaN/inf values are refused
unless allowed (`load_policy`). This module sits at the bottom of the package (config uses it): it reads files only;
checks against a model's modules live in `loading`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

__all__ = ["LoadPolicy", "check_adapter_file", "load_policy", "read_safetensors"]

MAX_HEADER_BYTES = 16 * 1024 * 1024  # an adapter header is a few KB; anything near this is not an adapter
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Dotted names of letters, digits, `_` and `-`: no `/`, `\`, empty segments (`..`) or leading/trailing dots.
_KEY = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


@dataclass(frozen=True)
class LoadPolicy:
    """What loading accepts beyond safe, finite safetensors files.

    Args:
        allow_pickle (`bool`): read a legacy `adapter_model.bin` (pickle: can run code when loaded with an unsafe
            loader; peft reads it with `torch.load(weights_only=True)`). Only for files you trust.
        allow_nonfinite (`bool`): accept NaN/inf values.
    """

    allow_pickle: bool = False
    allow_nonfinite: bool = False


_DEFAULT_POLICY = LoadPolicy()
_POLICY: contextvars.ContextVar[LoadPolicy] = contextvars.ContextVar("bitfit_load_policy", default=_DEFAULT_POLICY)


@contextlib.contextmanager
def load_policy(allow_pickle: bool = False, allow_nonfinite: bool = False) -> Iterator[LoadPolicy]:
    """Accept pickle files and/or non-finite values for the loads inside the block (this thread/task only).

    Example:

    >>> from bitfit_peft.files import load_policy
    >>> with load_policy(allow_pickle=True) as policy:
    ...     policy.allow_pickle
    True
    """
    policy = LoadPolicy(allow_pickle, allow_nonfinite)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the header lists key {key!r} twice")
        seen[key] = value
    return seen


def _header(path: str, data: bytes | bytearray) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"the file has {len(data)} bytes, fewer than the 8-byte header length")
    length = int.from_bytes(data[:8], "little")
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(
            f"the header claims {length:,} bytes but the file has {len(data) - 8:,} after the length field"
            + (f" (limit {MAX_HEADER_BYTES:,})" if length > MAX_HEADER_BYTES else "")
        )
    try:
        header = json.loads(bytes(data[8 : 8 + length]), object_pairs_hook=_reject_duplicates)
    except ValueError as err:
        raise ValueError(f"the header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def read_safetensors(path: str, verify_finite: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file strictly: (tensors, header metadata). Tensors are views of one buffer.

    Args:
        path (`str`): the file.
        verify_finite (`bool`, *optional*): refuse NaN/inf values; default: unless `load_policy(allow_nonfinite=True)`.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    check_finite = not _POLICY.get().allow_nonfinite if verify_finite is None else verify_finite
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        header = _header(path, data)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ must map names to strings")
        start = 8 + int.from_bytes(data[:8], "little")
        size = len(data) - start
        tensors: dict[str, torch.Tensor] = {}
        ranges = []
        for key, entry in header.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ValueError(f"key {key!r} is not a dotted parameter name (path-like or empty parts)")
            if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
                raise ValueError(
                    f"tensor {key} has dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}"
                )
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"tensor {key} has shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise ValueError(f"tensor {key} has data_offsets {offsets!r}")
            begin, end = offsets
            dtype = DTYPES[entry["dtype"]]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= size or end - begin != nbytes:
                raise ValueError(
                    f"tensor {key} ({entry['dtype']} {shape}) needs {nbytes} bytes but its data_offsets {offsets} "
                    f"span {end - begin} of a {size}-byte data section"
                )
            ranges.append((begin, end, key))
            flat = (
                torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + begin) if nbytes else None
            )
            tensors[key] = flat.view(shape) if flat is not None else torch.empty(shape, dtype=dtype)
        ranges.sort()
        for (_, end_a, key_a), (begin_b, _, key_b) in zip(ranges, ranges[1:], strict=False):
            if begin_b < end_a:
                raise ValueError(f"tensors {key_a} and {key_b} overlap in the data section")
        floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
        if check_finite and floats and not torch.isfinite(torch.cat([t.reshape(-1).float() for _, t in floats])).all():
            bad = next(k for k, t in floats if not torch.isfinite(t).all())  # one check for all, then find which
            raise ValueError(
                f"tensor {bad} holds NaN or inf values (the adapter is broken; to load it anyway use "
                "bitfit_peft.files.load_policy(allow_nonfinite=True))"
            )
    except OSError as err:
        raise ValueError(f"Cannot read adapter file {path}: {err}") from None
    except ValueError as err:
        raise ValueError(
            f"Adapter file {path} is not a valid safetensors checkpoint ({err}). It may be truncated or corrupt (or "
            "crafted): save the adapter again with model.save_pretrained()."
        ) from None
    return tensors, metadata


def check_adapter_file(directory: str) -> None:
    """Check that the adapter weights in `directory` are a sound safetensors file, so a broken or hostile file fails
    before the model changes.

    Raises:
        ValueError: no weights; only a pickle file (without `load_policy(allow_pickle=True)`); or the safetensors
            file is truncated, corrupt, lies about its contents, holds NaN/inf or non-floating-point deltas.
    """
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
            if _POLICY.get().allow_pickle:
                return  # peft reads it with torch.load(weights_only=True)
            raise ValueError(
                f"{directory} holds only a pickle checkpoint ({WEIGHTS_NAME}). Pickle files can run code when loaded, "
                "so they are refused by default. Convert it with model.save_pretrained() (safetensors), or, for a "
                "file you trust, load it inside `with bitfit_peft.files.load_policy(allow_pickle=True):`."
            )
        raise ValueError(
            f"No adapter weights in {directory}: expected {SAFETENSORS_WEIGHTS_NAME} next to adapter_config.json "
            "(written by model.save_pretrained)."
        )
    tensors, _ = read_safetensors(path)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() and tensor.dtype not in (torch.int8, torch.uint8):
            raise ValueError(
                f"Adapter file {path} is not a valid BitFit checkpoint: tensor {key} has dtype {tensor.dtype}, "
                "expected floating point (or int8/uint8 for compact deltas)."
            )
