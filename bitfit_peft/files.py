"""Adapter files on disk, treated as untrusted input: a strict safetensors reader and the checks that run before
anything touches a model.

`read_safetensors` parses the format itself (an 8-byte header length, a JSON header, then the data) so that every
way a file can lie is refused with one clear line before any tensor is built: a header length beyond the file,
duplicate or path-like keys, unknown dtypes, shapes that disagree with the byte ranges, overlapping or out-of-file
ranges. Pickle files (`adapter_model.bin`) are never read unless the caller opts in, and NaN/inf values are refused
unless allowed (`load_policy`), which also says what a base-model fingerprint mismatch does (warn or raise). Packed
files (`compact`) are decoded here too, so a crafted layout fails as early as a crafted header. This module sits near
the bottom of the package (config uses it): it reads files only; checks against a model's modules live in `loading`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import compact
from .constants import CONFIG_NAME, KEY_PATTERN, PEFT_TYPE_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME

__all__ = [
    "LoadPolicy",
    "check_adapter_file",
    "current_policy",
    "load_policy",
    "read_adapter_config",
    "read_adapter_weights",
    "read_safetensors",
    "read_safetensors_header",
]

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


@dataclass(frozen=True)
class LoadPolicy:
    """What loading accepts beyond safe, finite safetensors files.

    Args:
        allow_pickle (`bool`): read a legacy `adapter_model.bin` (pickle: can run code when loaded with an unsafe
            loader; peft reads it with `torch.load(weights_only=True)`). Only for files you trust.
        allow_nonfinite (`bool`): accept NaN/inf values.
        on_fingerprint_mismatch (`str`): `"warn"` (default) or `"error"` when an adapter is loaded onto a base model
            whose fingerprint differs from the one recorded at save time (`BitFitConfig.base_fingerprint`).
    """

    allow_pickle: bool = False
    allow_nonfinite: bool = False
    on_fingerprint_mismatch: Literal["warn", "error"] = "warn"


_DEFAULT_POLICY = LoadPolicy()
_POLICY: contextvars.ContextVar[LoadPolicy] = contextvars.ContextVar("bitfit_load_policy", default=_DEFAULT_POLICY)


@contextlib.contextmanager
def load_policy(
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    on_fingerprint_mismatch: Literal["warn", "error"] = "warn",
) -> Iterator[LoadPolicy]:
    """Set what the loads inside the block accept (this thread/task only); see `LoadPolicy` for the options.

    Example:

    >>> from bitfit_peft.files import load_policy
    >>> with load_policy(allow_pickle=True, on_fingerprint_mismatch="error") as policy:
    ...     policy.allow_pickle, policy.on_fingerprint_mismatch
    (True, 'error')
    """
    if on_fingerprint_mismatch not in ("warn", "error"):
        raise ValueError(f"on_fingerprint_mismatch must be 'warn' or 'error', got {on_fingerprint_mismatch!r}.")
    policy = LoadPolicy(allow_pickle, allow_nonfinite, on_fingerprint_mismatch)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def current_policy() -> LoadPolicy:
    """The `LoadPolicy` in force here (the default one outside any `load_policy` block)."""
    return _POLICY.get()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the header lists key {key!r} twice")
        seen[key] = value
    return seen


def _header(data: bytes | bytearray) -> dict[str, Any]:
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
        header = _header(data)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ must map names to strings")
        start = 8 + int.from_bytes(data[:8], "little")
        size = len(data) - start
        tensors: dict[str, torch.Tensor] = {}
        ranges = []
        for key, entry in header.items():
            if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
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
        floats = [(k, t) for k, t in tensors.items() if t.is_floating_point()]
        if check_finite and floats and not torch.isfinite(torch.cat([t.reshape(-1).float() for _, t in floats])).all():
            bad = next(k for k, t in floats if not torch.isfinite(t).all())  # one check for all, then find which
            raise ValueError(
                f"tensor {bad} holds NaN or inf values (the adapter is broken; to load it anyway use "
                "bitfit_peft.files.load_policy(allow_nonfinite=True))"
            )
    except (OSError, ValueError) as err:
        raise _file_error(path, err) from None
    return tensors, metadata


def _file_error(path: str, err: Exception) -> ValueError:
    if isinstance(err, OSError):
        return ValueError(f"Cannot read adapter file {path}: {err}")
    return ValueError(
        f"Adapter file {path} is not a valid safetensors checkpoint ({err}). It may be truncated or corrupt (or "
        "crafted): save the adapter again with model.save_pretrained()."
    )


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`) and its size in bytes with the
    8-byte length field, checked as `read_safetensors` checks it, without reading the tensor data.

    Raises:
        ValueError: one line naming the file and what is wrong with its header.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(8)  # fewer than 8 bytes: at the end of the file, the next read returns nothing
            data += f.read(min(int.from_bytes(data, "little"), MAX_HEADER_BYTES))
        header = _header(data)
    except (OSError, ValueError) as err:
        raise _file_error(path, err) from None
    return header, len(data)


def read_adapter_config(directory: str) -> dict[str, Any]:
    """The `adapter_config.json` of a BitFit adapter directory, as saved: the one place that file is read.

    `config.read_config` builds a `BitFitConfig` from it; the model card renders it as saved.

    Raises:
        ValueError: the directory or its config is missing, the config is not a JSON object, or not a BitFit one.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory; pass an adapter directory written by save_pretrained().")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"{directory}: not a peft adapter, there is no {CONFIG_NAME}; pass a directory written by save_pretrained()."
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err}); save the adapter again.") from None
    if not isinstance(config, dict) or str(config.get("peft_type")) != PEFT_TYPE_NAME:
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{directory}: not a BitFit adapter (peft_type {found!r}, expected {PEFT_TYPE_NAME!r}).")
    return config


def check_adapter_file(directory: str) -> None:
    """Check that the adapter weights in `directory` are a sound safetensors file, so a broken or hostile file fails
    before the model changes.

    Raises:
        ValueError: no weights; only a pickle file (without `load_policy(allow_pickle=True)`); or the safetensors
            file is truncated, corrupt, lies about its contents, holds NaN/inf or non-floating-point deltas.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, PICKLE_WEIGHTS_NAME)):
            if _POLICY.get().allow_pickle:
                return  # peft reads it with torch.load(weights_only=True)
            raise ValueError(
                f"{directory} holds only a pickle checkpoint ({PICKLE_WEIGHTS_NAME}). Pickle files can run code when loaded, "
                "so they are refused by default. Convert it with model.save_pretrained() (safetensors), or, for a "
                "file you trust, load it inside `with bitfit_peft.files.load_policy(allow_pickle=True):`."
            )
        raise ValueError(
            f"No adapter weights in {directory}: expected {WEIGHTS_NAME} next to adapter_config.json "
            "(written by model.save_pretrained)."
        )
    read_adapter_weights(path)


def write_layout_metadata(path: str, limit: float = 1.05) -> None:
    """Add the packed layout's format, dtype and module order to the header of the packed file at `path` (and, in an
    int8 file, quantize the task head, which peft adds after the save hook).

    peft writes `{"format": "pt"}` only; this rewrites the (small) file once so that a reader sees the module order
    without torch. The module order is left out when it would make the file more than `limit` x its payload (tiny
    adapters, where the names outweigh the numbers). A file that is not packed, or already has it, is left alone.
    """
    from safetensors.torch import save_file

    tensors, metadata = read_safetensors(path, verify_finite=False)
    if not compact.is_packed(tensors) or "bitfit_layout" in metadata:
        return
    tensors = {k: v.clone() for k, v in tensors.items()}  # own memory, not views of the file buffer being replaced
    layout = compact.read_layout(tensors)
    parts = (compact.LAYOUT_KEY, compact.PACKED_KEY, compact.POSITIONS_KEY)
    float_heads = any(k not in parts and v.is_floating_point() for k, v in tensors.items())
    if compact.CODECS[layout["dtype"]].scaled and float_heads:
        # peft adds the task head to the state dict after the tuner's save hook, so it arrives here in float32: a
        # scaled (int8) file quantizes it too (its own scale), which brings a b_q + b_m2 MiniLM adapter under 8 KB
        keep = (layout.get("sparse") or {}).get("keep_fraction")
        tensors = compact.encode(compact.decode(tensors), layout["dtype"], keep)
    payload = compact.payload_bytes(tensors)
    for module_order in (True, False):
        meta = compact.safetensors_metadata(tensors, module_order=module_order)
        save_file(tensors, path, metadata=meta)
        if os.path.getsize(path) <= limit * payload:
            return


def read_adapter_weights(path: str) -> dict[str, torch.Tensor]:
    """Read an adapter safetensors file strictly and decode it (packed or not) to float32 tensors under peft's keys.

    Raises:
        ValueError: the file fails `read_safetensors`; a tensor that is not floating point outside a packed layout; a
            packed layout that is corrupt or crafted; NaN/inf after decoding (int8 scales live in the layout), unless
            `load_policy(allow_nonfinite=True)`.
    """
    tensors, _ = read_safetensors(path)
    packed_parts: tuple[str, ...] = ()
    scaled_heads: set[str] | None = set()  # None: the layout is broken, and decode below says how
    if compact.is_packed(tensors):
        packed_parts = (compact.LAYOUT_KEY, compact.PACKED_KEY, compact.POSITIONS_KEY)
        try:
            scaled_heads = set(compact.read_layout(tensors).get("heads") or ())
        except ValueError:
            scaled_heads = None
    for key, tensor in tensors.items():
        if scaled_heads is None or tensor.is_floating_point() or key in packed_parts:
            continue
        if compact.head_key(key) not in scaled_heads:
            raise ValueError(
                f"Adapter file {path} is not a valid BitFit checkpoint: tensor {key} has dtype {tensor.dtype}, "
                "expected floating point (integer tensors appear only in a packed layout: bitfit_packed, "
                "bitfit_layout, bitfit_positions, and int8 task heads the layout lists)."
            )
    if not packed_parts:
        return compact.decode(tensors)
    try:
        decoded = compact.decode(tensors)
    except ValueError as err:
        raise ValueError(f"Adapter file {path} is not a valid BitFit checkpoint: {err}") from None
    if not _POLICY.get().allow_nonfinite:
        bad = next(
            (k for k, v in decoded.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None
        )
        if bad is not None:
            raise ValueError(
                f"Adapter file {path}: {bad} decodes to NaN or inf values (the adapter is broken; to load it anyway "
                "use bitfit_peft.files.load_policy(allow_nonfinite=True))"
            )
    return decoded
