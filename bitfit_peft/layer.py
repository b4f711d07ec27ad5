"""`BitFitLayer`: wraps one layer that has (or may get) a bias, and holds one bias delta per adapter.

The forward folds the active delta into the bias argument of the layer's own op (`F.linear(x, W, b + delta)`,
`addmm` for Conv1D, `layer_norm(..., b + delta)`, the conv's bias): the cost is one add over the bias vector, not
an extra pass over the activations. Subclasses whose forward we cannot reproduce (quantized layers, anything that
overrides `forward`) get the delta added to their output instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .mapping import bias_shape
from .mixed import MixedBatch, current_mixed_batch

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


# The op each supported layer type runs, with the bias as an argument. Used only when the layer's class runs exactly
# this op (its `forward` is the parent's), so subclasses with their own forward fall back to an output add.
_FOLDS: tuple[tuple[type[nn.Module], Fold], ...] = (
    (nn.Linear, _linear),
    (Conv1D, _conv1d_gpt2),
    (nn.Conv1d, _conv),
    (nn.Conv2d, _conv),
    (nn.Conv3d, _conv),
    (nn.LayerNorm, _layer_norm),
    (nn.GroupNorm, _group_norm),
)


def _fold_for(layer: nn.Module) -> Fold | None:
    for cls, fold in _FOLDS:
        if isinstance(layer, cls) and type(layer).forward is cls.forward:
            return fold
    return None


class BitFitLayer(nn.Module, BaseTunerLayer):
    """A layer with one trainable bias delta per adapter over its frozen base layer.

    Args:
        base_layer (`nn.Module`): the wrapped layer (Linear, Conv1D, Conv1d/2d/3d, LayerNorm or GroupNorm).
        adapter_name (`str`): name of the first adapter.
        init_weights (`bool`): zero deltas (True) or random ones (False).
        positions (`list[int]`, *optional*): bias positions the delta covers (a fused-QKV slice); None = all.

    Example:

    >>> layer = BitFitLayer(nn.Linear(4, 3), "default")
    >>> layer.bitfit_delta["default"].shape
    torch.Size([3])
    """

    adapter_layer_names = ("bitfit_delta",)
    other_param_names = ("bitfit_index",)
    base_layer: Any  # a dynamic nn.Module: its weight/bias are read by name

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        init_weights: bool = True,
        positions: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bitfit_delta = nn.ParameterDict()
        self.bitfit_index = BufferDict(persistent=False)  # not saved: rebuilt from the config
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self._fold = _fold_for(base_layer)
        self._shape = bias_shape(base_layer)
        # Base bias as it was before the first merge, restored exactly by unmerge (None: merge created the bias).
        self._premerge_bias: torch.Tensor | None = None
        self._mixed_cache: dict[str, Any] | None = None
        self.update_layer(adapter_name, init_weights=init_weights, positions=positions)

    # ------------------------------------------------------------------ adapter state
    def update_layer(self, adapter_name: str, init_weights: bool = True, positions: list[int] | None = None) -> None:
        """Add a delta for `adapter_name` (zeros, or N(0, 0.05^2) when `init_weights` is False)."""
        device = next((p.device for p in self.base_layer.parameters()), torch.device("cpu"))
        shape = (len(positions),) if positions is not None else self._shape
        # Deltas live in float32 whatever the base dtype: bias updates are small, bf16 would round them away.
        delta = torch.zeros(shape, dtype=torch.float32, device=device)
        if not init_weights:
            nn.init.normal_(delta, std=0.05)
        self.bitfit_delta[adapter_name] = nn.Parameter(delta)
        if positions is not None:
            self.bitfit_index[adapter_name] = torch.tensor(positions, dtype=torch.long, device=device)
        self._mixed_cache = None
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._mixed_cache = None

    def full_delta(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta over the whole bias (zeros outside a fused slice)."""
        delta: torch.Tensor = self.bitfit_delta[adapter_name]
        if adapter_name not in self.bitfit_index:
            return delta
        index = self.bitfit_index[adapter_name]
        return delta.new_zeros(self._shape).index_add(0, index, delta)

    def _active_delta(self) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for name in self.active_adapters:
            if name in self.bitfit_delta:
                delta = self.full_delta(name)
                total = delta if total is None else total + delta
        return total

    def _compute_dtype(self, fallback: torch.dtype) -> torch.dtype:
        for name in ("weight", "bias"):
            t = getattr(self.base_layer, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
        return fallback

    def _with_base_bias(self, delta: torch.Tensor) -> torch.Tensor:
        """base bias + delta, computed in the delta's dtype and returned in the layer's dtype."""
        bias = self.base_layer.bias
        out = delta if bias is None else bias.to(delta.dtype) + delta
        return out.to(self._compute_dtype(delta.dtype))

    def _broadcast(self, delta: torch.Tensor, out: torch.Tensor, batched: bool) -> torch.Tensor:
        """View a (batch of) bias vector(s) so it adds onto the layer's output."""
        lead = (out.shape[0],) if batched else ()
        n_bias = len(self._shape)
        if isinstance(self.base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)):
            # channels-first: (B, C, *spatial)
            return delta.view(*lead, *self._shape, *([1] * (out.dim() - 2)))
        return delta.view(*lead, *([1] * (out.dim() - len(lead) - n_bias)), *self._shape)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        mixed = current_mixed_batch()
        if mixed is not None:
            return self._mixed_forward(x, mixed, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        delta = self._active_delta()
        if delta is None:
            return self.base_layer(x, *args, **kwargs)
        if self._fold is not None and not args and not kwargs:
            return self._fold(self.base_layer, x, self._with_base_bias(delta))
        out = self.base_layer(x, *args, **kwargs)
        return out + self._broadcast(delta.to(out.dtype), out, batched=False)

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            raise ValueError(
                f"Cannot run a mixed-adapter batch while adapters {self.merged_adapters} are merged into the base "
                "model: call model.unmerge_adapter() first."
            )
        rows = mixed.rows_for(x.shape[0], x.device)
        table, lookup = self._mixed_table(mixed, x.device)
        out = self.base_layer(x, *args, **kwargs)
        deltas = table.index_select(0, lookup.index_select(0, rows)).to(out.dtype)
        deltas = self._broadcast(deltas, out, batched=True)
        return out.add_(deltas) if not torch.is_grad_enabled() else out + deltas

    def _mixed_table(self, mixed: MixedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's packed table of full deltas (row 0 = zeros) and the global-slot -> row lookup.

        Built once per set of resident adapters; on later calls only the rows of the adapters used in the batch are
        checked (same Parameter object, same in-place version) and refreshed if stale, so a call costs O(adapters in
        the batch), independent of how many adapters are resident.
        """
        cache = self._mixed_cache
        if cache is None or cache["generation"] != mixed.generation or cache["table"].device != device:
            names = [n for n in self.bitfit_delta if n in mixed.slots]
            table = torch.zeros((len(names) + 1, *self._shape), dtype=torch.float32, device=device)
            lookup = torch.zeros(len(mixed.slots) + 1, dtype=torch.long, device=device)
            rows: dict[str, int] = {}
            for row, name in enumerate(names, start=1):
                rows[name] = row
                lookup[mixed.slots[name]] = row
            cache = {"generation": mixed.generation, "table": table, "lookup": lookup, "rows": rows, "seen": {}}
            self._mixed_cache = cache
        seen: dict[str, tuple[nn.Parameter, int]] = cache["seen"]
        with torch.no_grad():
            for name in mixed.unique:
                row = cache["rows"].get(name)
                if row is None:
                    continue
                param = self.bitfit_delta[name]
                if seen.get(name) != (param, param._version):
                    cache["table"][row] = self.full_delta(name).to(device=device, dtype=torch.float32)
                    seen[name] = (param, param._version)
        return cache["table"], cache["lookup"]

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base bias (creating it for `add_missing_bias` layers).

        Args:
            safe_merge (`bool`): compute the merged bias in a copy and refuse non-finite results.
            adapter_names (`list[str]`, *optional*): adapters to merge; default: the active ones.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.bitfit_delta]
        if not names:
            return
        base = self.base_layer
        with torch.no_grad():
            total = sum((self.full_delta(n) for n in names), torch.zeros(self._shape, device=self._device()))
            merged = self._with_base_bias(total)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging adapters {names} gives non-finite biases in {type(base).__name__}; the adapter is "
                    "broken (NaN/inf deltas). Nothing was merged."
                )
            if not self.merged_adapters:
                self._premerge_bias = None if base.bias is None else base.bias.detach().clone()
            if base.bias is None:
                base.bias = nn.Parameter(merged, requires_grad=False)
            else:
                base.bias.data = merged.to(base.bias.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the base bias exactly as it was before the first merge."""
        if not self.merged:
            return
        base = self.base_layer
        if self._premerge_bias is None:
            base.bias = None
        else:
            base.bias.data = self._premerge_bias.to(base.bias.device)
        self._premerge_bias = None
        self.merged_adapters = []

    def _device(self) -> torch.device:
        return next(iter(self.bitfit_delta.values())).device

    def __repr__(self) -> str:
        return f"bitfit.{super().__repr__()}"
