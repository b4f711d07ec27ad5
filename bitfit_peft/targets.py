"""Target selection: which modules of a model get a BitFit delta, and which positions of a fused bias it covers.

Modules are picked by structure: by layer type (`layer_types`), by whether they have a bias, and, for the paper's
named bias terms, by the per-architecture rules of `architectures`. peft's own filters (exclude_modules,
layers_to_transform, modules_to_save) keep their semantics.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from . import layer_types
from .architectures import ARCHITECTURES, TASK_HEADS, matches, slice_positions
from .layer_types import base_of, bias_shape, layer_type

if TYPE_CHECKING:  # config sits below this module; the import is for annotations only
    from .config import BitFitConfig

__all__ = ["select_targets"]


def _is_candidate(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    entry = layer_type(module)
    # a parent that reads the child's weight and bias directly (nn.MultiheadAttention) would ignore a wrapper
    return entry is not None and not (parent is not None and isinstance(parent, entry.not_under))


def _has_bias(module: nn.Module) -> bool:
    return getattr(base_of(module), "bias", None) is not None


def _under_head(key: str, heads: set[str]) -> bool:
    """Whether the module or one of its parents is a head peft wraps whole: peft matches `path.endswith(name)`
    (plain suffix, so DistilBERT's `pre_classifier` is a head too)."""
    parts = key.split(".")
    return any(".".join(parts[: i + 1]).endswith(h) for i in range(len(parts)) for h in heads)


def _passes_filters(config: BitFitConfig, key: str) -> bool:
    """exclude_modules, modules_to_save and layers_to_transform with peft's own semantics."""
    probe = SimpleNamespace(
        target_modules=[key.rsplit(".", 1)[-1]],
        target_parameters=None,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    return bool(check_target_module_exists(probe, key))


def select_targets(
    model: nn.Module, config: BitFitConfig, model_config: dict[str, Any]
) -> dict[str, list[int] | None]:
    """Map each module to target to the bias positions its delta covers (None: the whole bias).

    Raises:
        ValueError: the config selects nothing (with candidate module names), or `bias_terms` is used on an
            architecture without a mapping.
    """
    model_type = model_config.get("model_type")
    rules = None
    if config.bias_terms is not None:
        rules = ARCHITECTURES.get(model_type or "")
        if rules is None and set(config.bias_terms) != {"layernorm"}:
            raise ValueError(
                f"bias_terms={sorted(config.bias_terms)} needs a known architecture, but model_type {model_type!r} "
                f"has no BitFit mapping (known: {sorted(ARCHITECTURES)}). Pass target_modules=[...] with the module "
                "names instead, e.g. the names listed by model.named_modules()."
            )
    heads = set(config.modules_to_save or ()) | set(TASK_HEADS.get(config.task_type or "", ()))
    skip_under: list[str] = []
    selected: dict[str, list[int] | None] = {}
    without_bias: list[str] = []
    parents: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        if any(key.startswith(p) for p in skip_under):
            continue
        for child_name, _child in module.named_children():
            parents[f"{key}.{child_name}" if key else child_name] = module
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            skip_under.append(key + ".")  # never look inside an adapter wrapper or a saved head
        if not key or not _is_candidate(key, module, parents.get(key)) or _under_head(key, heads):
            continue
        positions: list[int] | None = None
        if config.target_modules is not None:
            if not check_target_module_exists(config, key):
                continue
        else:
            if not _passes_filters(config, key):
                continue
            if config.bias_terms is not None:
                wanted = set(config.bias_terms)
                if "layernorm" in wanted and isinstance(base_of(module), layer_types.NORM_TYPES):
                    pass
                else:
                    hits = [r for t in wanted - {"layernorm"} for r in (rules or {}).get(t, []) if matches(r, key)]
                    if not hits:
                        continue
                    if all(r.part is not None for r in hits):
                        size = bias_shape(module)[0]
                        positions = sorted({p for r in hits for p in slice_positions(r, size, model_config)})
                        if len(positions) == size:
                            positions = None
        if not (_has_bias(module) or config.add_missing_bias):
            without_bias.append(key)
            continue
        selected[key] = positions
    if not selected:
        raise ValueError(_nothing_selected_message(model, config, model_type, without_bias))
    return selected


def _nothing_selected_message(
    model: nn.Module, config: BitFitConfig, model_type: str | None, without_bias: list[str]
) -> str:
    what = (
        f"target_modules={config.target_modules!r}"
        if config.target_modules is not None
        else f"bias_terms={sorted(config.bias_terms)}"
        if config.bias_terms is not None
        else "the default (every bias)"
    )
    msg = f"BitFitConfig with {what} selected no module of {type(model).__name__} (model_type={model_type!r})."
    if without_bias:
        return (
            f"{msg} {len(without_bias)} matching modules have no bias (e.g. {without_bias[:4]}): set "
            "add_missing_bias=True to give them a zero-initialised delta."
        )
    candidates = [
        k for k, m in model.named_modules() if k and isinstance(m, layer_types.SUPPORTED_TYPES) and _has_bias(m)
    ]
    return (
        f"{msg} Modules with a bias include {candidates[:6]}. Check target_modules / bias_terms / exclude_modules / "
        "layers_to_transform / modules_to_save."
    )
