"""Mixed-batch routing of a peft model with BitFit adapters: snapshot builds, task-head routing, and locking.

`Router` (one per tuner) owns the model's `RWLock` and its current `Routing` snapshot. Every forward/generate call
holds the lock for reading; adapter changes hold it for writing. A mixed call gets a snapshot that is fresh for the
adapters it names (rebuilt under the writer lock when adapters were added, removed or replaced, or the model moved
device) and every layer and head of the call reads only that snapshot.

Heads are routed without per-call changes to shared modules: the first build gives each peft `ModulesToSaveWrapper`
a forward that reads the running call's routing (and behaves exactly as before when there is none), and the other
auxiliary wrappers and the input embeddings a permanent pre-hook; nothing is installed or removed per call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .layer import BitFitLayer, Changes, state_update
from .routing import Routing, RWLock, current_mixed_batch, route_heads
from .tables import LayerTable

__all__ = ["Router", "build_routing", "install_token_hook", "router_for"]

_ROUTERS: weakref.WeakKeyDictionary[nn.Module, Router] = weakref.WeakKeyDictionary()
_ROUTERS_LOCK = threading.Lock()
_INSTALLED = "_bitfit_routed"  # marks a module whose routing hook is installed (kept in its __dict__)


class Router:
    """The lock and the current routing snapshot of one model (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = RWLock()
        self.routing: Routing | None = None

    def invalidate(self) -> None:
        """Drop the snapshot; the next mixed call rebuilds it. Takes the writer lock (waits for calls in flight)."""
        with self.lock.write():
            self.routing = None

    @contextmanager
    def reading(self, model: nn.Module, adapters: Iterable[str], unique: Sequence[str]) -> Iterator[Routing]:
        """Hold the reader lock with a snapshot that is fresh for the adapters in `unique`."""
        lock = self.lock
        if lock.holds():  # a nested call in the same thread: it cannot rebuild, so it reuses the snapshot
            nested = self.routing if self.routing is not None else build_routing(model, adapters)
            with lock.read():
                yield nested
            return
        while True:
            routing = self.routing
            stale = _stale_copies(routing, unique) if routing is not None and _current(routing) else None
            if routing is not None and stale is not None and not stale:
                lock.acquire_read()
                if self.routing is routing:
                    break
                lock.release_read()
                continue
            with lock.write():
                if self.routing is routing:
                    if routing is not None and stale:
                        _refresh(routing, stale)
                    else:
                        self.routing = build_routing(model, adapters)
        try:
            yield routing  # type: ignore[misc]  # the loop only breaks with a snapshot
        finally:
            lock.release_read()


def router_for(model: nn.Module) -> Router:
    """The `Router` of a model (created on first use; not copied by `copy.deepcopy`)."""
    router = _ROUTERS.get(model)
    if router is None:
        with _ROUTERS_LOCK:
            router = _ROUTERS.setdefault(model, Router())
    return router


def _probe(model: nn.Module) -> tuple[torch.Tensor | None, torch.device | None]:
    param = next((p for p in model.parameters()), None)
    return param, None if param is None else param.device


def _current(routing: Routing) -> bool:
    """Whether no delta Parameter was added, replaced or removed and the model did not move since the build."""
    count, probe, device = routing.key
    return count == Changes.count and (probe is None or probe.device == device)


def _stale_copies(routing: Routing, unique: Sequence[str]) -> list[tuple[str, int]] | None:
    """Copied rows of the adapters in the batch whose Parameter changed in place since it was copied; None when a
    task head changed (a rebuild is needed)."""
    stale: list[tuple[str, int]] = []
    for name in unique:
        for i, (_layer, param, version) in enumerate(routing.copies.get(name, ())):
            if param._version != version:
                stale.append((name, i))
    for wrapper, heads in routing.heads.items():
        for name in unique:
            if (name in wrapper.modules_to_save) != (name in heads):
                return None
    return stale


def _refresh(routing: Routing, stale: list[tuple[str, int]]) -> None:
    """Copy the stale rows in again (under the writer lock: no call reads the table meanwhile)."""
    with state_update():
        for name, i in stale:
            layer, param, _ = routing.copies[name][i]
            routing.tables[layer].put(name, routing.slots[name], layer.full_delta(name))
            routing.copies[name][i] = (layer, param, param._version)


def _layer_table(layer: BitFitLayer, slots: dict[str, int], routing: Routing) -> None:
    """Pack the layer's deltas into one table; full-width deltas of the table's dtype move into their rows (same
    Parameter object, storage now a view of the table), so resident adapters cost their payload once."""
    deltas, partial = layer._delta_params(), layer._index_buffers()
    names = sorted((n for n in deltas if n in slots), key=slots.__getitem__)
    if not names:
        return
    first = deltas[names[0]]
    dtype = first.dtype if first.is_floating_point() else torch.float32
    device = first.device
    # every slot has a row here, in slot order: no lookup needed (rows are numbered by slot)
    lookup_slots = None if len(names) == len(slots) else len(slots)
    with state_update():
        entry = LayerTable.empty(layer._shape, dtype, device, rows=len(names) + 1, slots=lookup_slots)
        for name in names:
            param = deltas[name]
            row = entry.put(name, slots[name], layer.full_delta(name))
            if name not in partial and param.dtype == dtype and param.device == device:
                param.data = entry.table[row]  # the table is never grown: this snapshot's rows stay put
            else:
                routing.copies.setdefault(name, []).append((layer, param, param._version))
    routing.tables[layer] = entry


def build_routing(model: nn.Module, adapters: Iterable[str]) -> Routing:
    """A snapshot of `model`'s BitFit layers and task heads for the given adapters (call under the writer lock)."""
    names = sorted(adapters)
    param, device = _probe(model)
    routing = Routing(slots={name: i for i, name in enumerate(names, start=1)}, key=(Changes.count, param, device))
    for module in model.modules():
        if isinstance(module, BitFitLayer):
            _layer_table(module, routing.slots, routing)
        elif isinstance(module, ModulesToSaveWrapper):
            _install(module, "forward")
            routing.heads[module] = {n: module.modules_to_save[n] for n in names if n in module.modules_to_save}
        elif isinstance(module, AuxiliaryTrainingWrapper):
            _install(module, "names_kwarg")
    install_token_hook(model)
    config = getattr(model, "config", None)
    # DeBERTa's relative-position embeddings go through targeted layers once for the whole batch
    routing.shared_rows = getattr(config, "model_type", None) in ("deberta", "deberta-v2") and bool(
        getattr(config, "relative_attention", False)
    )
    return routing


def install_token_hook(model: nn.Module) -> None:
    """Record the tokens per row of each model input into the running mixed call (for layers that see the batch
    flattened with its tokens, e.g. OPT's FFN). Installed once; inert outside mixed calls."""
    get_embeddings: Any = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Module):
        _install(embeddings, "tokens")


def _install(module: nn.Module, kind: str) -> None:
    """Install a routing hook once; it is inert outside mixed calls."""
    if module.__dict__.get(_INSTALLED):
        return
    if kind == "forward":
        module.__dict__["forward"] = _RoutedForward(module)  # type: ignore[arg-type]
    elif kind == "names_kwarg":
        module.register_forward_pre_hook(_names_kwarg, with_kwargs=True)
    else:
        module.register_forward_pre_hook(_record_tokens)
    module.__dict__[_INSTALLED] = True


def _record_tokens(module: nn.Module, args: tuple) -> None:
    mixed = current_mixed_batch()
    if mixed is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
        mixed.tokens = args[0].shape[1]


def _names_kwarg(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    mixed = current_mixed_batch()
    if mixed is None:
        return None
    x = args[0] if args else None
    kwargs["adapter_names"] = mixed.names_for(x.shape[0] if isinstance(x, torch.Tensor) else len(mixed.names))
    return args, kwargs


class _RoutedForward:
    """The forward of a routed `ModulesToSaveWrapper` (a picklable, deep-copyable callable, unlike a bound function
    that is not a method of the class)."""

    def __init__(self, wrapper: ModulesToSaveWrapper) -> None:
        self.wrapper = wrapper

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return _routed_head_forward(self.wrapper, x, *args, **kwargs)


def _routed_head_forward(wrapper: ModulesToSaveWrapper, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Outside a mixed call: the wrapper's own forward. In one: each example through its adapter's copy of the head
    (the base head for `__base__` or an adapter without one), by `routing.route_heads`."""
    mixed = current_mixed_batch()
    if mixed is None or wrapper.disable_adapters:
        return type(wrapper).forward(wrapper, x, *args, **kwargs)
    return route_heads(mixed, mixed.routing.heads.get(wrapper, {}), wrapper.original_module, x, args, kwargs)
