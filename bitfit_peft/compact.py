"""Compact adapter files: packed, half-precision, int8 and sparse storage of BitFit deltas, as plain tensors.

`encode` turns a peft-keyed adapter state dict into a few tensors that any safetensors reader (and so every peft
entry point) can load, and `decode` turns them back into the original keys in float32:

- every `...bitfit_delta` is concatenated, in state-dict order, into one flat tensor `bitfit_packed` (float32,
  bfloat16, float16 or int8), so the safetensors header holds a handful of entries instead of one per bias;
- `bitfit_layout` (uint8) holds the zlib-compressed JSON layout: the delta keys and sizes, the int8 scales, the
  sparse position encoding. It travels inside the tensors because peft's loader drops the safetensors header
  metadata before the tuner sees the state dict;
- with `keep_fraction`, only the largest-magnitude fraction of each delta is kept; `bitfit_positions` (uint8) holds
  where they go, as a bitmap or as gaps between kept positions, whichever is smaller for the file;
- task-head tensors (keys without `bitfit_delta`, e.g. `base_model.model.classifier.out_proj.weight`) keep their own
  names, because peft renames each head key one by one before the tuner hook runs; in int8 they are int8 with their
  scale in the layout.

int8 is symmetric absmax with one scale per tensor: on a MiniLM b_q + b_m2 SST-2 adapter, per-block scales (16 to 256
values a block) left the max abs error where it was (1.13e-3 to 1.17e-3) and cost 96 to 1,440 bytes of scales.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .constants import DELTA_ATTR as DELTA_MARKER  # the last component of every delta key in a saved state dict
from .constants import KEY_PATTERN, PREFIX
from .constants import PEFT_KEY_PREFIX as PEFT_PREFIX  # what PeftModel.state_dict() puts before the base's keys

FORMAT_VERSION = 1
LAYOUT_KEY = f"{PREFIX}layout"
PACKED_KEY = f"{PREFIX}packed"
POSITIONS_KEY = f"{PREFIX}positions"
POSITION_ENCODINGS = ("bitmap", "gaps")
# Most delta values a layout may describe: 1 GiB of float32, far above any model's biases (Llama-70B with every
# linear layer given a bias has about 10M). A hostile layout cannot make decode allocate more.
MAX_VALUES = 2**28
_GAP_ESCAPE = 255  # a gap byte of 255 means "skip 255 positions, no value here"
_HEAD_COPY = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")  # peft's per-adapter copy of a head, renamed on load

__all__ = [
    "CODECS",
    "SAVE_DTYPES",
    "Codec",
    "codec",
    "decode",
    "encode",
    "is_packed",
    "payload_bytes",
    "read_layout",
    "register_codec",
    "safetensors_metadata",
]


@dataclass(frozen=True)
class Codec:
    """One storage dtype of the deltas (`BitFitConfig.save_dtype`, the layout's `dtype`, `bitfit-peft convert --to`).

    Args:
        name (`str`): the value users pass and files record, e.g. `"int8"`.
        dtype (`torch.dtype`): what the stored values are.
        quantize (`Callable`, *optional*): float32 tensor -> (scale, stored values) with `values * scale ~ x`, one
            scale per tensor kept in the layout. Scaled codecs store the task head scaled too, refuse NaN/inf, and
            exist only in the packed layout. None: a plain cast.
        packed_by_default (`bool`): with `packed` unset, save the packed layout (False: one tensor per bias, the
            form any tool reads).
    """

    name: str
    dtype: torch.dtype
    quantize: Callable[[torch.Tensor], tuple[float, torch.Tensor]] | None = None
    packed_by_default: bool = True

    @property
    def scaled(self) -> bool:
        """Whether values carry a scale (so the file must be packed: the scales live in the layout)."""
        return self.quantize is not None

    def encode(self, key: str, x: torch.Tensor) -> tuple[float | None, torch.Tensor]:
        """(scale or None, stored values) of the float32 tensor `x` saved under `key`."""
        if self.quantize is None:
            return None, x.to(self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{key} holds NaN or inf values, which {self.name} cannot store; fix the adapter before converting."
            )
        return self.quantize(x)


CODECS: dict[str, Codec] = {}


def register_codec(entry: Codec) -> Codec:
    """Add a storage dtype: the one place a new one goes (config validation, save, load, the CLI and size
    accounting all read `CODECS`)."""
    CODECS[entry.name] = entry
    return entry


def codec(name: Any, what: str = "save_dtype") -> Codec:
    """The codec called `name`; a ValueError naming the known ones otherwise."""
    entry = CODECS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"Invalid {what} {name!r}. Must be one of {list(CODECS)}.")
    return entry


def is_packed(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether `tensors` were written by `encode` (they hold a `bitfit_layout` tensor)."""
    return LAYOUT_KEY in tensors


def encode(
    state: dict[str, torch.Tensor], save_dtype: str, keep_fraction: float | None = None
) -> dict[str, torch.Tensor]:
    """Pack the deltas of an adapter state dict into one flat tensor of `save_dtype`, optionally sparse.

    Args:
        state (`dict[str, torch.Tensor]`): an adapter state dict as peft saves it (`...bitfit_delta` keys, plus task
            head tensors, which keep their names).
        save_dtype (`str`): a key of `CODECS`: `"float32"`, `"bfloat16"`, `"float16"`, `"int8"` (symmetric absmax,
            one scale per tensor).
        keep_fraction (`float`, *optional*): keep only this fraction (0 < f <= 1) of each delta, the entries largest
            in magnitude; the others decode as 0. Task heads are always kept whole.

    Returns:
        `dict[str, torch.Tensor]`: `bitfit_packed`, `bitfit_layout`, `bitfit_positions` when sparse, and the head
        tensors under their own keys.

    Example:

    >>> enc = encode({"m.bitfit_delta": torch.tensor([0.5, -1.0, 0.01])}, "int8", keep_fraction=0.7)
    >>> decode(enc)["m.bitfit_delta"]  # int8 rounds 0.5 to 64/127; the smallest value is pruned
    tensor([ 0.5039, -1.0000,  0.0000])
    """
    store = codec(save_dtype)
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}; e.g. 0.1 keeps the largest 10%.")
    if is_packed(state):
        raise ValueError("The state dict is already packed (it holds bitfit_layout); decode it before encoding again.")
    deltas = {k: v for k, v in state.items() if k.endswith(DELTA_MARKER)}
    if not deltas:
        raise ValueError(
            f"No '{DELTA_MARKER}' tensors in the state dict (keys: {sorted(state)[:3]}...): pass the state dict of a "
            "BitFit adapter, as get_peft_model_state_dict or a saved adapter_model.safetensors holds it."
        )
    layout: dict[str, Any] = {"v": FORMAT_VERSION, "dtype": save_dtype, "keys": [], "shapes": []}
    values, scales, kept_index, offset = [], [], [], 0
    for key, tensor in deltas.items():
        flat = tensor.detach().float().cpu().flatten()
        layout["keys"].append(key)
        layout["shapes"].append(list(tensor.shape))
        if keep_fraction is not None and keep_fraction < 1.0:
            k = max(1, round(keep_fraction * flat.numel())) if flat.numel() else 0
            index = flat.abs().topk(k).indices.sort().values
            kept_index.append(index + offset)
            flat = flat[index]
        offset += tensor.numel()
        scale, flat = store.encode(key, flat)
        if scale is not None:
            scales.append(scale)
        values.append(flat)
    out: dict[str, torch.Tensor] = {PACKED_KEY: torch.cat(values)}
    if store.scaled:
        layout["scales"] = scales
    if kept_index:
        encoding, positions = _encode_positions(torch.cat(kept_index).numpy(), offset)
        layout["sparse"] = {"keep_fraction": keep_fraction, "encoding": encoding}
        out[POSITIONS_KEY] = torch.from_numpy(positions)
    heads: dict[str, float] = {}
    for key, tensor in state.items():
        if key in deltas:
            continue
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        scale, out[key] = store.encode(key, tensor.detach().float().cpu() if store.scaled else tensor.detach().cpu())
        if scale is not None:
            heads[_canonical(key)] = scale
    # The scales follow the compressed JSON as raw float32: as JSON text they cost three times the bytes.
    scale_values = layout.pop("scales", [])
    if heads:
        layout["heads"] = list(heads)
        scale_values += list(heads.values())
    raw = zlib.compress(json.dumps(layout, separators=(",", ":")).encode(), 9)
    raw += np.asarray(scale_values, dtype="<f4").tobytes()
    out[LAYOUT_KEY] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def decode(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack what `encode` wrote into the original keys and shapes, in float32.

    Head keys may have been renamed by peft on load (`classifier.modules_to_save.default.out_proj.weight`); their
    int8 scale is found all the same. A state dict that is not packed comes back with its floating tensors in float32.

    Raises:
        ValueError: the layout is unreadable or from a newer format, or the tensors do not match it.
    """
    if not is_packed(tensors):
        return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    layout = read_layout(tensors)
    keys, shapes = layout["keys"], [tuple(s) for s in layout["shapes"]]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    packed = tensors.get(PACKED_KEY)
    if packed is None:
        raise ValueError(f"Corrupt BitFit file: {LAYOUT_KEY} is there but {PACKED_KEY} is missing. Save it again.")
    total = sum(sizes)
    sparse = layout.get("sparse")
    if sparse:
        if POSITIONS_KEY not in tensors:
            raise ValueError(f"Corrupt BitFit file: sparse layout but no {POSITIONS_KEY} tensor. Save it again.")
        stored = tensors[POSITIONS_KEY]
        if stored.dtype != torch.uint8 or stored.dim() != 1:  # wider or signed bytes could point anywhere
            raise ValueError(
                f"Corrupt BitFit file: {POSITIONS_KEY} is {stored.dtype} of shape {tuple(stored.shape)}, expected "
                "torch.uint8 bytes (one dimension). Save the adapter again."
            )
        positions = _decode_positions(stored.cpu().numpy(), sparse["encoding"], total)
        counts = np.bincount(np.searchsorted(np.cumsum(sizes), positions, side="right"), minlength=len(sizes))
    else:
        positions, counts = None, np.array(sizes)
    store = CODECS[layout["dtype"]]  # read_layout checked it is known
    if packed.dtype != store.dtype:
        raise ValueError(
            f"Corrupt BitFit file: the layout says {layout.get('dtype')} but {PACKED_KEY} holds {packed.dtype}. "
            "Save the adapter again."
        )
    if packed.numel() != int(counts.sum()):
        raise ValueError(
            f"Corrupt BitFit file: {PACKED_KEY} holds {packed.numel()} values but the layout needs {int(counts.sum())}."
        )
    values = packed.float()
    if store.scaled:
        scales = torch.tensor(layout["scales"], dtype=torch.float32)
        values = values * scales.repeat_interleave(torch.from_numpy(counts.astype(np.int64)))
    full = values
    if positions is not None:
        full = torch.zeros(total, dtype=torch.float32)
        full[torch.from_numpy(positions.astype(np.int64))] = values
    out: dict[str, torch.Tensor] = {}
    for key, shape, chunk in zip(keys, shapes, torch.split(full, sizes), strict=True):
        out[key] = chunk.reshape(shape).to(packed.device)
    head_scales = layout.get("head_scales", {})
    for key, tensor in tensors.items():
        if key in (LAYOUT_KEY, PACKED_KEY, POSITIONS_KEY):
            continue
        if store.scaled and tensor.dtype == store.dtype:
            scale = head_scales.get(_canonical(key))
            if scale is None:
                raise ValueError(
                    f"Corrupt BitFit file: {store.name} tensor {key} has no scale in the layout. Save it again."
                )
            out[key] = tensor.float() * scale
        else:
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def read_layout(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The decoded JSON layout of a packed state dict (keys, shapes, dtype, scales, sparse encoding)."""
    try:
        stream = zlib.decompressobj()
        layout: dict[str, Any] = json.loads(stream.decompress(tensors[LAYOUT_KEY].cpu().numpy().tobytes()))
        scales = np.frombuffer(stream.unused_data, dtype="<f4").tolist()
    except (zlib.error, ValueError, KeyError) as err:
        raise ValueError(f"Corrupt BitFit file: {LAYOUT_KEY} cannot be read ({err}). Save the adapter again.") from err
    if not stream.eof:
        raise ValueError(f"Corrupt BitFit file: {LAYOUT_KEY} is truncated. Save the adapter again.")
    if layout.get("v", 0) > FORMAT_VERSION:
        raise ValueError(
            f"This BitFit file uses layout version {layout.get('v')}, newer than this bitfit-peft reads "
            f"({FORMAT_VERSION}): upgrade bitfit-peft."
        )
    _check_layout(layout)
    if CODECS[layout["dtype"]].scaled:
        n = len(layout.get("keys", []))
        heads = layout.get("heads", [])
        if len(scales) != n + len(heads):
            raise ValueError(
                f"Corrupt BitFit file: {LAYOUT_KEY} holds {len(scales)} scales, expected {n + len(heads)}."
            )
        layout["scales"], layout["head_scales"] = scales[:n], dict(zip(heads, scales[n:], strict=True))
    return layout


def _check_layout(layout: dict[str, Any]) -> None:
    """Refuse a layout whose keys, shapes or dtype could not have come from `encode` (crafted or corrupt)."""
    keys, shapes = layout.get("keys"), layout.get("shapes")
    if not isinstance(layout.get("dtype"), str) or layout["dtype"] not in CODECS:
        raise ValueError(f"Corrupt BitFit file: layout dtype {layout.get('dtype')!r} is not one of {list(CODECS)}.")
    if not isinstance(keys, list) or not isinstance(shapes, list) or len(keys) != len(shapes):
        raise ValueError("Corrupt BitFit file: the layout needs as many shapes as keys. Save the adapter again.")
    bad = [k for k in keys if not isinstance(k, str) or not KEY_PATTERN.fullmatch(k) or not k.endswith(DELTA_MARKER)]
    if bad:
        raise ValueError(f"Corrupt BitFit file: layout key {bad[0]!r} is not a dotted '...{DELTA_MARKER}' name.")
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"Corrupt BitFit file: the layout lists key {twice!r} twice.")
    if not all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes):
        raise ValueError("Corrupt BitFit file: a layout shape is not a list of non-negative integers.")
    total = sum(int(np.prod(s, dtype=np.float64)) for s in shapes)
    if total > MAX_VALUES:
        raise ValueError(
            f"Corrupt BitFit file: the layout claims {total:,} delta values, more than any model's biases "
            f"(limit {MAX_VALUES:,})."
        )


def safetensors_metadata(tensors: dict[str, torch.Tensor], module_order: bool = True) -> dict[str, str]:
    """The `__metadata__` to write with packed tensors: format, dtype and (optionally) the module order.

    peft's loader ignores it (the layout tensor is what decodes); it lets a reader see the order without torch.
    The module order is written as a common prefix and the comma-separated rest, and costs about 45 bytes a
    module: on small int8 files that alone can exceed 5% of the payload (`module_order=False` leaves it out).
    """
    meta = {"format": "pt"}
    if is_packed(tensors):
        layout = read_layout(tensors)
        meta.update({"bitfit_layout": str(layout["v"]), "bitfit_dtype": layout["dtype"]})
        if layout.get("sparse"):
            meta["bitfit_keep_fraction"] = str(layout["sparse"]["keep_fraction"])
        if module_order:
            modules = [k.removeprefix(PEFT_PREFIX).removesuffix("." + DELTA_MARKER) for k in layout["keys"]]
            prefix = os.path.commonprefix(modules)
            prefix = prefix[: prefix.rfind(".") + 1]  # whole components only
            meta["bitfit_module_prefix"] = prefix
            meta["bitfit_modules"] = ",".join(m.removeprefix(prefix) for m in modules)
    return meta


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the numbers an adapter carries: values, head tensors, sparse positions and int8 scales (4 bytes each).

    The rest of a file (safetensors header, the layout's keys and shapes) is overhead.
    """
    size = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != LAYOUT_KEY)
    if is_packed(tensors):
        layout = read_layout(tensors)
        size += 4 * (len(layout.get("scales", [])) + len(layout.get("head_scales", {})))
    return size


def head_key(key: str) -> str:
    """A task-head key as the layout lists it: peft prefix and per-adapter copy (`modules_to_save.<name>`) removed."""
    return _HEAD_COPY.sub("", key).removeprefix(PEFT_PREFIX)


_canonical = head_key


def _quantize(x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Symmetric absmax int8: `x ~ q * scale` with `q` in [-127, 127]."""
    absmax = float(x.abs().max()) if x.numel() else 0.0
    scale = float(np.float32(absmax / 127.0))  # what the file stores and decode multiplies by
    if scale == 0.0:  # all zeros, empty, or too small for a float32 scale: x / scale would be inf or NaN
        return 0.0, torch.zeros(x.shape, dtype=torch.int8)
    # a subnormal scale is coarse: x / scale can pass 127, and int8 would wrap it to the other sign
    return scale, torch.round(x / scale).clamp(-127, 127).to(torch.int8)


for _entry in (
    Codec("float32", torch.float32, packed_by_default=False),
    Codec("bfloat16", torch.bfloat16),
    Codec("float16", torch.float16),
    Codec("int8", torch.int8, quantize=_quantize),
):
    register_codec(_entry)
SAVE_DTYPES = tuple(CODECS)  # the built-in storage dtypes (read `CODECS` for the current ones)


def _encode_positions(positions: np.ndarray, total: int) -> tuple[str, np.ndarray]:
    """Sorted kept positions as a bitmap (total / 8 bytes) or as gap bytes (about one per value), the smaller."""
    bitmap = np.zeros(total, dtype=bool)
    bitmap[positions] = True
    bits = np.packbits(bitmap, bitorder="little")
    gaps = np.diff(positions, prepend=-1) - 1
    escapes = gaps // _GAP_ESCAPE
    out = np.full(int(escapes.sum()) + len(gaps), _GAP_ESCAPE, dtype=np.uint8)
    ends = np.cumsum(escapes + 1) - 1  # each gap's final byte follows its escapes
    out[ends] = gaps % _GAP_ESCAPE
    return ("gaps", out) if out.nbytes < bits.nbytes else ("bitmap", bits)


def _decode_positions(data: np.ndarray, encoding: str, total: int) -> np.ndarray:
    """Kept positions from the uint8 `data` `_encode_positions` wrote: strictly increasing by construction (a set
    bit each, or a gap of at least 0 plus one), so only the last can be out of range."""
    if encoding == "bitmap":
        positions = np.flatnonzero(np.unpackbits(data, bitorder="little"))
    elif encoding == "gaps":
        is_value = data != _GAP_ESCAPE
        positions = (np.cumsum(data + is_value) - 1)[is_value]
    else:
        raise ValueError(f"Unknown sparse position encoding {encoding!r} (known: {list(POSITION_ENCODINGS)}).")
    if positions.size and positions[-1] >= total:
        raise ValueError(
            f"Corrupt BitFit file: sparse position {positions[-1]} is out of range (the layout has {total} values). "
            "Save the adapter again."
        )
    return positions
