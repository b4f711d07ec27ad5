"""The layer types BitFit can train a bias of, each with its bias op, listed once.

A `LayerType` says how to run the layer's own op with a given bias (so the delta is folded into the op's bias
argument, not added to the output), the shape of the bias it has or would have, and whether its output is
channels-first (convolutions, GroupNorm) for broadcasting a per-example delta onto it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

Fold = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(m: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight, b)


def _conv1d_gpt2(m: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.addmm(b, x.reshape(-1, x.size(-1)), m.weight)
    return out.view(*x.shape[:-1], m.nf)


def _conv(m: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return m._conv_forward(x, m.weight, b)


def _layer_norm(m: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, b, m.eps)


def _group_norm(m: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, m.num_groups, m.weight, b, m.eps)


@dataclass(frozen=True)
class LayerType:
    """One trainable layer type.

    Args:
        cls (`type`): the module class.
        fold (`Fold`): runs the class's own op with a given bias: `fold(module, x, bias)`.
        bias_size (`Callable`): the bias shape the layer would have without one (for `add_missing_bias`).
        channels_first (`bool`): outputs are `(batch, channels, *spatial)`, so a bias broadcasts over dim 1.
        norm (`bool`): a normalisation layer (the paper's `layernorm` bias term).
    """

    cls: type[nn.Module]
    fold: Fold
    bias_size: Callable[[Any], tuple[int, ...]]
    channels_first: bool = False
    norm: bool = False


LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType(nn.Linear, _linear, lambda m: (m.out_features,)),
    LayerType(Conv1D, _conv1d_gpt2, lambda m: (m.nf,)),
    LayerType(nn.Conv1d, _conv, lambda m: (m.out_channels,), channels_first=True),
    LayerType(nn.Conv2d, _conv, lambda m: (m.out_channels,), channels_first=True),
    LayerType(nn.Conv3d, _conv, lambda m: (m.out_channels,), channels_first=True),
    LayerType(nn.LayerNorm, _layer_norm, lambda m: tuple(m.normalized_shape), norm=True),
    LayerType(nn.GroupNorm, _group_norm, lambda m: (m.num_channels,), channels_first=True, norm=True),
)
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = tuple(t.cls for t in LAYER_TYPES)
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(t.cls for t in LAYER_TYPES if t.norm)


def base_of(module: nn.Module) -> nn.Module:
    """The layer a BitFit wrapper (or any peft tuner layer) wraps, or the module itself."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def layer_type(module: nn.Module) -> LayerType | None:
    """The `LayerType` of a layer (or of the layer a wrapper wraps), or None if BitFit cannot train it."""
    base = base_of(module)
    for entry in LAYER_TYPES:
        if isinstance(base, entry.cls):
            return entry
    return None


def fold_for(layer: nn.Module) -> Fold | None:
    """The bias op of `layer` when its class runs exactly that op (its `forward` is the supported parent's);
    subclasses with their own forward get None, and BitFit adds the delta to their output instead."""
    for entry in LAYER_TYPES:
        if isinstance(layer, entry.cls) and type(layer).forward is entry.cls.forward:
            return entry.fold
    return None


def bias_shape(module: nn.Module) -> tuple[int, ...]:
    """Shape of the layer's bias, or of the bias it would have (for `add_missing_bias`).

    Example:

    >>> bias_shape(nn.Conv2d(3, 5, 1, bias=False))
    (5,)
    """
    base: Any = base_of(module)
    if getattr(base, "bias", None) is not None:
        return tuple(base.bias.shape)
    entry = layer_type(base)
    if entry is None:
        raise TypeError(
            f"BitFit cannot train a bias of {type(base).__name__}: supported layer types are "
            f"{[t.__name__ for t in SUPPORTED_TYPES]}."
        )
    return entry.bias_size(base)


def broadcast_bias(
    delta: torch.Tensor, out: torch.Tensor, shape: tuple[int, ...], channels_first: bool, batched: bool
) -> torch.Tensor:
    """View a bias of `shape` (or one per example, when `batched`) so it adds onto the layer's output `out`."""
    lead = (out.shape[0],) if batched else ()
    if channels_first:  # (B, C, *spatial)
        return delta.view(*lead, *shape, *([1] * (out.dim() - 2)))
    return delta.view(*lead, *([1] * (out.dim() - len(lead) - len(shape))), *shape)
