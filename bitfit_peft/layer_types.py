"""The layer types BitFit can train a bias of, each with its bias op, registered once.

A `LayerType` says how to run the layer's own op with a given bias (so the delta is folded into the op's bias
argument, not added to the output), the shape of the bias it has or would have, its (in, out) features, whether its
output is channels-first (convolutions, GroupNorm) for broadcasting a per-example delta onto it, and the parents
under which it must not be wrapped. `register_layer_type` is the one place a new type goes (as peft's dispatchers
are): target selection, the layer, the norm bias term and the bias op all read `LAYER_TYPES`.
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
        features (`Callable`): `(in_features, out_features)` as peft's layers expose them.
        channels_first (`bool`): outputs are `(batch, channels, *spatial)`, so a bias broadcasts over dim 1.
        norm (`bool`): a normalisation layer (the paper's `layernorm` bias term).
        not_under (`tuple[type, ...]`): parents that read this child's weight and bias directly instead of calling
            its forward (`nn.MultiheadAttention`'s `out_proj`): a wrapper there would be silently ignored.
    """

    cls: type[nn.Module]
    fold: Fold
    bias_size: Callable[[Any], tuple[int, ...]]
    features: Callable[[Any], tuple[int, int]]
    channels_first: bool = False
    norm: bool = False
    not_under: tuple[type[nn.Module], ...] = ()


LAYER_TYPES: list[LayerType] = []
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = ()  # kept current by register_layer_type
NORM_TYPES: tuple[type[nn.Module], ...] = ()


def register_layer_type(entry: LayerType) -> LayerType:
    """Make BitFit train the bias of `entry.cls` (the one place a layer type is added; a class registered again
    replaces its entry). Read `SUPPORTED_TYPES` / `NORM_TYPES` through this module, not by `from` import, to see
    later registrations.

    Example:

    >>> class Scale(nn.Module):  # y = w * x + b
    ...     def __init__(self, n: int) -> None:
    ...         super().__init__()
    ...         self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x * self.weight + self.bias
    >>> _ = register_layer_type(LayerType(Scale, lambda m, x, b: x * m.weight + b, lambda m: m.bias.shape,
    ...                                   lambda m: (m.bias.numel(),) * 2))
    >>> layer_type(Scale(3)).cls.__name__
    'Scale'
    >>> unregister_layer_type(Scale)
    """
    global SUPPORTED_TYPES, NORM_TYPES
    LAYER_TYPES[:] = [t for t in LAYER_TYPES if t.cls is not entry.cls] + [entry]
    SUPPORTED_TYPES = tuple(t.cls for t in LAYER_TYPES)
    NORM_TYPES = tuple(t.cls for t in LAYER_TYPES if t.norm)
    return entry


def unregister_layer_type(cls: type[nn.Module]) -> None:
    """Remove the entry of `cls` (tests, plugins)."""
    global SUPPORTED_TYPES, NORM_TYPES
    LAYER_TYPES[:] = [t for t in LAYER_TYPES if t.cls is not cls]
    SUPPORTED_TYPES = tuple(t.cls for t in LAYER_TYPES)
    NORM_TYPES = tuple(t.cls for t in LAYER_TYPES if t.norm)


def _channels(m: Any) -> tuple[int, int]:
    return int(m.in_channels), int(m.out_channels)


def _norm_features(m: Any) -> tuple[int, int]:
    size = bias_shape(m)[-1]
    return size, size  # norms: features in == out


for _entry in (
    LayerType(
        nn.Linear,
        _linear,
        lambda m: (m.out_features,),
        lambda m: (m.in_features, m.out_features),
        not_under=(nn.MultiheadAttention,),
    ),
    LayerType(
        Conv1D, _conv1d_gpt2, lambda m: (m.nf,), lambda m: (int(m.weight.shape[0]), int(m.nf))
    ),  # weight: (in, out)
    LayerType(nn.Conv1d, _conv, lambda m: (m.out_channels,), _channels, channels_first=True),
    LayerType(nn.Conv2d, _conv, lambda m: (m.out_channels,), _channels, channels_first=True),
    LayerType(nn.Conv3d, _conv, lambda m: (m.out_channels,), _channels, channels_first=True),
    LayerType(nn.LayerNorm, _layer_norm, lambda m: tuple(m.normalized_shape), _norm_features, norm=True),
    LayerType(nn.GroupNorm, _group_norm, lambda m: (m.num_channels,), _norm_features, channels_first=True, norm=True),
):
    register_layer_type(_entry)


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
