"""A cheap fingerprint of a base model, so an adapter can tell whether it is being loaded onto the model it was trained on.

`fingerprint` hashes (SHA-256) the targeted base biases, the first row of each targeted layer's weight and three
rows of the input embeddings, rounded to bfloat16 precision and written as float32 little-endian bytes in module-name
order: a few hundred kilobytes at most, never the whole model. The rounding makes a float32 base and its bfloat16
cast (a server running `--dtype bfloat16`) the same base, while another checkpoint or a fine-tuned one still differs;
a float16 cast may not match (rounding twice can land on another bfloat16 value) and then warns. A quantized target
weight (bitsandbytes, torchao) adds a marker instead of its row: any quantized load of a checkpoint matches itself,
and differs from the float load of it (the weights the adapter was trained against do differ). It is computed on the
base weights: BitFit layers are looked through to the layer they wrap, and merged adapters are refused.
"""

from __future__ import annotations

import hashlib
import struct

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .constants import DELTA_ATTR as DELTA_MARKER
from .constants import PEFT_KEY_PREFIX as PEFT_PREFIX

ALGORITHM = "bf1:sha256"
HEX_CHARS = 20

__all__ = ["fingerprint", "target_modules_of"]


def target_modules_of(keys: list[str]) -> list[str]:
    """Module paths in the base model from adapter state-dict keys (`base_model.model.x.y.bitfit_delta` -> `x.y`)."""
    return [k.removeprefix(PEFT_PREFIX).removesuffix("." + DELTA_MARKER) for k in keys if k.endswith(DELTA_MARKER)]


def fingerprint(model: nn.Module, target_keys: list[str] | None = None) -> str:
    """A short, deterministic hash of the base model's weights that matter to a BitFit adapter.

    Args:
        model (`nn.Module`): the base model, or a `PeftModel` / BitFit-injected model over it (adapters unmerged).
        target_keys (`list[str]`, *optional*): the modules the adapter targets, as module paths
            (`bert.encoder.layer.0.attention.self.query`) or adapter keys (`base_model.model.<path>.bitfit_delta`).
            Unset: every module with a bias in the backbone (`model.<base_model_prefix>`), which leaves out task heads
            that are initialised at random each time the base model is built.

    Returns:
        `str`: e.g. `"bf1:sha256:3f2a..."` (20 hex characters).

    Raises:
        ValueError: a target is not in the model, or an adapter is merged into the base weights.

    Example:

    >>> fingerprint(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2)))[:11]
    'bf1:sha256:'
    """
    get_base_model = getattr(model, "get_base_model", None)
    base: nn.Module = get_base_model() if callable(get_base_model) else model
    merged = sorted(n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer) and m.merged)
    if merged:
        raise ValueError(
            f"Adapters are merged into {merged[:2]}: the fingerprint must read the base weights. Call "
            "model.unmerge_adapter() first."
        )
    modules = _unwrapped_modules(base)
    if target_keys is None:
        prefix = getattr(base, "base_model_prefix", "")
        backbone = f"{prefix}." if prefix and isinstance(getattr(base, prefix, None), nn.Module) else ""
        names = sorted(n for n, m in modules.items() if n.startswith(backbone) and _param(m, "bias") is not None)
    else:
        names = sorted(set(target_modules_of(list(target_keys)) + [k for k in target_keys if DELTA_MARKER not in k]))
        names = [n.removeprefix(PEFT_PREFIX) for n in names]
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(
                f"Fingerprint targets {missing[:3]} are not modules of this model: pass module paths of the base "
                "model (as in the adapter's keys), or leave target_keys unset."
            )
    digest = hashlib.sha256()
    for name in names:
        module = modules[name]
        _update(digest, _plain(_param(module, "bias")))
        weight = _param(module, "weight")
        if weight is not None and _quantized(weight):
            digest.update(b"\x00quantized")
        else:
            _update(digest, _plain(weight) if weight is None or weight.dim() < 2 else _rows(weight, [0])[0])
    weight = _param(_input_embeddings(base), "weight")
    if weight is not None and weight.dim() == 2 and not _quantized(weight):
        n = weight.shape[0]
        _update(digest, _rows(weight, [0, n // 2, n - 1]))
    return f"{ALGORITHM}:{digest.hexdigest()[:HEX_CHARS]}"


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embeddings of the model or of the first submodule that knows them (custom heads over a backbone)."""
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        if callable(get):
            try:
                embeddings = get()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(embeddings, nn.Module):
                return embeddings
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the base layer at that path, looking through tuner layers and saved-module wrappers."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or "original_module" in parts or "modules_to_save" in parts:
            continue  # reached through their wrapper below
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = getattr(module, "original_module", module)
        out[name] = module
    return out


def _param(module: nn.Module | None, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _quantized(tensor: torch.Tensor) -> bool:
    """A quantized weight: bitsandbytes' integer storage, or a torchao tensor subclass (a DTensor is not one)."""
    if hasattr(tensor, "device_mesh"):  # torch.distributed.tensor.DTensor: look at the local shard
        tensor = tensor.to_local()  # type: ignore[attr-defined]
    return not tensor.is_floating_point() or type(tensor) not in (torch.Tensor, nn.Parameter)


def _plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A small tensor (a bias, a 1-D weight) as a plain tensor: a sharded DTensor (FSDP2) is gathered, a collective,
    so every rank computes the fingerprint together; a quantized one gives an empty tensor (a marker)."""
    if tensor is None:
        return None
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.new_empty(0) if _quantized(tensor) else tensor


def _rows(weight: torch.Tensor, index: list[int]) -> torch.Tensor:
    """`weight[index]`; for a DTensor sharded on dim 0 (FSDP2), only those rows travel: each rank fills the rows
    it holds into zeros and an all-reduce sums them (exact), instead of gathering the whole weight."""
    placements = getattr(weight, "placements", None)
    if placements is None:
        return weight[index]
    import torch.distributed as dist

    mesh = weight.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1 or not placements[0].is_shard(0):
        return weight.full_tensor()[index]  # type: ignore[attr-defined]
    local = weight.to_local()  # type: ignore[attr-defined]
    chunk = -(-weight.shape[0] // mesh.size())  # torch.chunk's split, as FSDP2 shards dim 0
    start = chunk * mesh.get_local_rank()
    out = torch.zeros(len(index), *weight.shape[1:], dtype=local.dtype, device=local.device)
    for i, row in enumerate(index):
        if start <= row < start + local.shape[0]:
            out[i] = local[row - start]
    dist.all_reduce(out, group=mesh.get_group())
    return out


def _update(digest: hashlib._Hash, tensor: torch.Tensor | None) -> None:
    """Add a tensor's shape and bfloat16-rounded values (as float32 little-endian, -0.0 as 0.0) to the hash; None adds
    a marker."""
    if tensor is None:
        digest.update(b"\x00none")
        return
    data = tensor.detach().to("cpu").to(torch.bfloat16).to(torch.float32).contiguous() + 0.0
    digest.update(struct.pack(f"<{data.dim() + 1}q", data.dim(), *data.shape))
    digest.update(data.numpy().astype("<f4", copy=False).tobytes())
