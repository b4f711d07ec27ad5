"""`BitFitLayer`: wraps one layer that has (or may get) a bias, and holds one bias delta per adapter.

The forward folds the active delta into the bias argument of the layer's own op (`F.linear(x, W, b + delta)`,
`addmm` for Conv1D, `layer_norm(..., b + delta)`, the conv's bias): the cost is one add over the bias vector, not
an extra pass over the activations. Subclasses whose forward we cannot reproduce (quantized layers, anything that
overrides `forward`) get the delta added to their output instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .layer_types import Fold, bias_shape, broadcast_bias, fold_for, layer_type
from .routing import InFlight, MixedBatch, current_mixed_batch

# std of the deltas drawn by `init_weights=False`: large enough that two random adapters clearly give different
# outputs (peft's own test mixins compare merged adapters at atol=rtol=1e-3), as peft's other methods' random inits do.
RANDOM_INIT_STD = 0.5

_current_mixed_batch_eager = torch.compiler.disable(current_mixed_batch)


class Changes:
    """A number that changes whenever a delta Parameter is added, replaced or removed on any BitFit layer
    (`load_state_dict(assign=True)`, peft's dtype cast and deletes replace Parameter objects): routing snapshots
    record it and rebuild when it moved."""

    count = 0


class DeltaDict(nn.ParameterDict):
    """`nn.ParameterDict` of per-adapter deltas that counts changes of its entries (see `Changes`)."""

    def __setattr__(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            Changes.count += 1
        super().__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        Changes.count += 1
        super().__delitem__(key)


@contextlib.contextmanager
def state_update() -> Iterator[None]:
    """For caches and tables that outlive the call: plain tensors even when the caller runs under
    `torch.inference_mode()` (inference tensors could not be updated, or hold Parameters, afterwards)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


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
        self.bitfit_delta = DeltaDict()
        self.bitfit_index = BufferDict(persistent=False)  # not saved: rebuilt from the config
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self._fold: Fold | None = fold_for(base_layer)
        self._shape = bias_shape(base_layer)
        entry = layer_type(base_layer)
        self._channels_first = bool(entry and entry.channels_first)
        if entry is None:
            raise TypeError(
                f"BitFit cannot train a bias of {type(base_layer).__name__}: register its type with "
                "bitfit_peft.layer_types.register_layer_type."
            )
        self.in_features, self.out_features = entry.features(base_layer)
        # Base bias as it was before the first merge, restored exactly by unmerge (None: merge created the bias).
        self._premerge_bias: torch.Tensor | None = None
        self._bias_cache: tuple[Any, torch.Tensor] | None = None
        self._grad_on: set[str] = set()  # adapters whose deltas set_adapter made trainable
        self.update_layer(adapter_name, init_weights=init_weights, positions=positions)

    # Hot-path accessors: plain dicts, read without going through nn.Module.__getattr__.
    def _delta_params(self) -> dict[str, Any]:
        return self._modules["bitfit_delta"]._parameters  # type: ignore[union-attr]

    def _base_params(self) -> dict[str, Any]:
        return self._modules["base_layer"]._parameters  # type: ignore[union-attr]

    def _index_buffers(self) -> dict[str, Any]:
        return self._modules["bitfit_index"]._buffers  # type: ignore[union-attr]

    # ------------------------------------------------------------------ adapter state
    def update_layer(self, adapter_name: str, init_weights: bool = True, positions: list[int] | None = None) -> None:
        """Add a delta for `adapter_name` (zeros, or N(0, RANDOM_INIT_STD^2) when `init_weights` is False).

        The delta is created in the base layer's floating dtype; peft then upcasts bf16/fp16 deltas to float32
        unless `autocast_adapter_dtype=False` (peft's convention for every method): bias updates are small, and
        bf16 would round most of them away.
        """
        # A quantized base layer stores its weight as integers (bitsandbytes) or a tensor subclass (torchao): the
        # delta goes on the weight's device, in the layer's compute dtype (see `_compute_dtype`), never in storage's.
        any_param = next(self.base_layer.parameters(), None)
        device = any_param.device if any_param is not None else torch.device("cpu")
        dtype = self._compute_dtype(torch.float32)
        shape = (len(positions),) if positions is not None else self._shape
        delta = torch.zeros(shape, dtype=torch.float32, device=device)
        if not init_weights:
            nn.init.normal_(delta, std=RANDOM_INIT_STD)
        delta = delta.to(dtype)
        self.bitfit_delta[adapter_name] = nn.Parameter(delta, requires_grad=adapter_name in self.active_adapters)
        if adapter_name in self.active_adapters:
            self._grad_on.add(adapter_name)
        if positions is not None:
            self.bitfit_index[adapter_name] = torch.tensor(positions, dtype=torch.long, device=device)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate `adapter_names` (trainable unless `inference_mode`), freezing the previously trainable deltas.

        peft's version visits every resident adapter of every layer, which makes loading the N-th adapter O(N);
        here only the adapters that change state are touched.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        deltas = self._delta_params()
        want = set() if inference_mode else {n for n in names if n in deltas}
        for name in self._grad_on - want:
            if name in deltas:
                deltas[name].requires_grad_(False)
        for name in want:
            deltas[name].requires_grad_(True)
        self._grad_on = want
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if not enabled:
            self._grad_on = set()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self._grad_on = (self._grad_on | names) if requires_grad else (self._grad_on - names)

    def full_delta(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta over the whole bias (zeros outside a fused slice)."""
        delta: torch.Tensor = self._delta_params()[adapter_name]
        index = self._index_buffers().get(adapter_name)
        if index is None:
            return delta
        return delta.new_zeros(self._shape).index_add(0, index, delta)

    def _active_names(self) -> list[str]:
        # Hot path: read the containers directly instead of through nn.Module.__getattr__.
        deltas = self._delta_params()
        active = self._active_adapter
        if isinstance(active, str):
            return [active] if active in deltas else []
        return [n for n in active if n in deltas]

    def _active_delta(self, names: list[str]) -> torch.Tensor:
        total = self.full_delta(names[0])
        for name in names[1:]:
            total = total + self.full_delta(name)
        return total

    def _compute_dtype(self, fallback: torch.dtype) -> torch.dtype:
        """The dtype the layer computes in: its float weight's or bias's, else a quantized layer's `compute_dtype`
        (bitsandbytes' Linear4bit; torchao subclasses report their float dtype as `.dtype`), else `fallback`."""
        params = self._base_params()
        for name in ("weight", "bias"):
            t = params.get(name)
            if t is not None and t.is_floating_point():
                return t.dtype
        compute = getattr(self.base_layer, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) else fallback

    def _with_base_bias(self, delta: torch.Tensor) -> torch.Tensor:
        """base bias + delta, computed in the delta's dtype and returned in the layer's dtype."""
        bias = self._base_params().get("bias")
        out = delta if bias is None else bias.to(delta.dtype) + delta
        return out.to(self._compute_dtype(delta.dtype))

    def _effective_bias(self, names: list[str]) -> torch.Tensor:
        """base bias + the active deltas, as the layer's op takes it.

        When no gradient is needed (inference), the result is cached and reused until a delta or the base bias
        changes (tracked by the tensors' in-place version counters), so unmerged inference runs the layer's own op
        with no extra kernel.
        """
        deltas = self._delta_params()
        params = [deltas[n] for n in names]
        # Under torch.compile the add is traced into the graph (and fused): a cached tensor would be baked in as a
        # constant that in-place updates (hotswap) could not reach.
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self._with_base_bias(self._active_delta(names))
        bias = self._base_params().get("bias")
        key = (tuple((id(p), p._version) for p in params), id(bias), None if bias is None else bias._version)
        cached = self._bias_cache
        if cached is None or cached[0] != key:
            with state_update():
                cached = (key, self._with_base_bias(self._active_delta(names)))
            self._bias_cache = cached
        return cached[1]

    def _broadcast(self, delta: torch.Tensor, out: torch.Tensor, batched: bool) -> torch.Tensor:
        """View a (batch of) bias vector(s) so it adds onto the layer's output."""
        return broadcast_bias(delta, out, self._shape, self._channels_first, batched)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            # Compiled code cannot read a context variable; it guards on the plain in-flight count instead, and only
            # a mixed call pays a graph break to fetch its routing (so mixed batches stay correct under compile).
            mixed = _current_mixed_batch_eager() if InFlight.count else None
        else:
            mixed = current_mixed_batch()
        if mixed is not None:
            return self._mixed_forward(x, mixed, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        base: Any = self._modules["base_layer"]
        names = self._active_names()
        if not names:
            return base(x, *args, **kwargs)
        if self._fold is not None and not args and not kwargs:
            return self._fold(base, x, self._effective_bias(names))
        out = base(x, *args, **kwargs)
        return out + self._broadcast(self._active_delta(names).to(out.dtype), out, batched=False)

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged_adapters:
            raise ValueError(
                f"Cannot run a mixed-adapter batch while adapters {self.merged_adapters} are merged into the base "
                "model: call model.unmerge_adapter() first."
            )
        out = self.base_layer(x, *args, **kwargs)
        entry = mixed.routing.tables.get(self)
        if entry is None:
            return out  # no routable adapter touches this layer
        table = entry.table
        if table.device != out.device:
            raise RuntimeError(
                f"The mixed-batch table of {type(self.base_layer).__name__} is on {table.device} but the layer ran on "
                f"{out.device}; routing is rebuilt at the start of a call after model.to(...), so move the model "
                "between calls, not during one."
            )
        deltas = self._broadcast(entry.gather(mixed.rows_for(x.shape[0], x.device)).to(out.dtype), out, batched=True)
        return out.add_(deltas) if not torch.is_grad_enabled() else out + deltas

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
                # peft's own sentence first: users and tools match on it.
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken. "
                    f"(Merging adapters {names} gives non-finite biases in {type(base).__name__}: NaN/inf deltas. "
                    "Nothing was merged.)"
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
