"""Per-call routing of mixed-task batches, and the lock that keeps it consistent under concurrency.

A mixed call (`model(**batch, adapter_names=[...])`) resolves the names once into slot numbers (slot 0 is the base
model) and publishes a `MixedBatch` in a context variable for the duration of the call: each thread (and each
asyncio task) sees only its own call's routing, and no shared module is modified per call. The `MixedBatch` points at
one `Routing` snapshot, the packed per-layer delta tables and per-adapter task heads every layer of the call reads.

`RWLock` orders forward calls (readers, any number at once) against adapter changes (writers: load, delete, hotswap,
table builds): a change waits for the calls in flight, and a call waits for the change, so every call sees each
adapter either entirely before or entirely after a change, in every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .constants import BASE
from .tables import LayerTable

__all__ = [
    "BASE",
    "InFlight",
    "LayerTable",
    "MixedBatch",
    "RWLock",
    "Routing",
    "current_mixed_batch",
    "mixed_batch",
    "route_heads",
]

_CURRENT: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("bitfit_mixed_batch", default=None)


class InFlight:
    """How many mixed-batch calls are running (any thread). torch.compile cannot read a context variable, but it can
    guard on this plain value, so a compiled layer notices a mixed call and fetches its routing eagerly."""

    count = 0
    _lock = threading.Lock()

    @classmethod
    def add(cls, n: int) -> None:
        with cls._lock:  # `count += n` is a read-modify-write: two threads could lose an update without the lock
            cls.count += n


_generations = itertools.count(1)


def new_generation() -> int:
    """A fresh number identifying one routing snapshot."""
    return next(_generations)


class RWLock:
    """Many readers or one writer, writer-preferring, re-entrant per thread (a writer may also read).

    Readers are forward/generate calls; writers change adapters or rebuild routing tables. Writer preference means
    a load is not starved by a steady stream of requests: new calls wait behind a waiting writer.

    Example:

    >>> lock = RWLock()
    >>> with lock.read(), lock.read():  # re-entrant
    ...     pass
    >>> with lock.write(), lock.read():  # a writer may read
    ...     pass
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # thread ident of the writer
        self._waiting_writers = 0
        self._local = threading.local()

    def _read_depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def holds(self) -> bool:
        """Whether this thread holds the lock (reading or writing)."""
        return self._writer == threading.get_ident() or bool(self._read_depth())

    @torch.compiler.disable  # bookkeeping, not model code: keep it out of compiled graphs
    def acquire_read(self) -> None:
        """Take a read hold (re-entrant); pair with `release_read`."""
        depth = self._read_depth()
        if self._writer == threading.get_ident() or depth:
            self._local.depth = depth + 1
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1

    @torch.compiler.disable
    def release_read(self) -> None:
        depth = self._read_depth()
        self._local.depth = depth - 1
        if depth > 1 or self._writer == threading.get_ident():
            return
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:  # re-entrant: the outer `write` releases
            yield
            return
        if self._read_depth():
            raise RuntimeError(
                "An adapter change (load, delete, hotswap, merge) was started from inside a forward call of the same "
                "model; change adapters between calls."
            )
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


@dataclass(eq=False)
class Routing:
    """A snapshot of everything a mixed call reads: slots, per-layer tables and per-adapter task heads.

    Built under the writer lock and only read by calls (which hold the reader lock), so no call ever sees a
    half-built or half-updated snapshot.

    Args:
        slots (`dict[str, int]`): slot of every routable adapter (1..N, the same numbering on every layer).
        tables (`dict`): BitFit layer -> its `LayerTable` (layers no routable adapter touches are absent).
        heads (`dict`): routed task head (peft `ModulesToSaveWrapper` or a serving head) -> adapter -> module.
        generation (`int`): identifies the snapshot.
        shared_rows (`bool`): the model runs some targeted layers once for the whole batch (DeBERTa relative
            attention), so it cannot route per example.
        copies (`dict`): adapter -> rows that hold a copy of a delta (fused slices, another dtype), with the
            Parameter and its version when copied, checked per call so in-place edits are seen.
    """

    slots: dict[str, int]
    tables: dict[Any, LayerTable] = field(default_factory=dict)
    heads: dict[Any, dict[str, Any]] = field(default_factory=dict)
    generation: int = field(default_factory=new_generation)
    shared_rows: bool = False
    copies: dict[str, list[tuple[Any, torch.Tensor, int]]] = field(default_factory=dict)
    key: Any = None  # what the snapshot was built from (checked by the owner before reuse)


@dataclass
class MixedBatch:
    """Per-call routing: `names[i]` is the adapter of example i, resolved against one `Routing` snapshot.

    Args:
        names (`list[str]`): one adapter name per example (`"__base__"` for none).
        routing (`Routing`): the snapshot every layer of this call reads.
        beams (`int`): beam-search width; layers seeing `len(names) * beams` rows repeat each name `beams` times.
        tokens (`int`, *optional*): tokens per row of the latest model input, for layers that see the batch
            flattened to (rows * tokens, features), batch-major (OPT's FFN).
    """

    names: list[str]
    routing: Routing
    beams: int = 1
    tokens: int | None = None
    _rows: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)

    def _repeat(self, batch: int, flattened: bool) -> int:
        """How many consecutive rows each example has in an input of `batch` rows. Rows are batch-major: each
        example's beams and, when a layer flattens them (`flattened`), each example's tokens."""
        n = len(self.names)
        allowed = {1, self.beams}
        if flattened and self.tokens:
            allowed |= {self.tokens, self.beams * self.tokens}
        repeat = batch // n if batch % n == 0 else 0
        if repeat not in allowed:
            raise ValueError(
                f"adapter_names has {n} entries but a layer received a batch of {batch} rows. Pass one adapter "
                "name per example, with the batch in dimension 0 of the inputs."
            )
        return repeat

    def names_for(self, batch: int) -> list[str]:
        """The adapter name of each of `batch` rows of a task head's input (see `rows_for`)."""
        repeat = self._repeat(batch, flattened=False)
        return [name for name in self.names for _ in range(repeat)]

    def rows_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """Slot of each row of an input with `batch` rows, on `device` (cached per call)."""
        key = (batch, device)
        rows = self._rows.get(key)
        if rows is None:
            repeat = self._repeat(batch, flattened=True)
            slots = self.routing.slots
            ids = torch.tensor([slots.get(name, 0) for name in self.names], dtype=torch.long)
            rows = ids.repeat_interleave(repeat).to(device)
            self._rows[key] = rows
        return rows


def route_heads(
    mixed: MixedBatch,
    heads: Mapping[str, Callable[..., Any]],
    default: Callable[..., Any],
    x: torch.Tensor,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    pad: bool = False,
) -> torch.Tensor:
    """Each row of a mixed call through its adapter's task head (`default` for `__base__` or an adapter without
    one), for heads of any structure: rows are grouped by adapter, one call per group, then put back in order.

    The one head router of both the peft-model routing (`router`) and the serving store (`serving.model.TaskHeads`).
    With `pad`, heads of different widths (2 labels beside 6) are zero-padded to the widest in the call; without it,
    the widths must agree.
    """
    kwargs = kwargs or {}
    n = x.shape[0]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(mixed.names_for(n)):
        groups.setdefault(name, []).append(i)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, rows in groups.items():
        module = heads.get(name, default)
        index = torch.tensor(rows, device=x.device)

        def take(t: Any, index: torch.Tensor = index) -> Any:
            return t.index_select(0, index) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t

        y = module(take(x), *(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"Mixed-adapter batches route task heads that return one tensor; {type(module).__name__} returned "
                f"{type(y).__name__}. Group the batch by task and use set_adapter instead."
            )
        parts.append((index, y))
    first = parts[0][1]
    if pad:
        width = max(y.shape[-1] for _, y in parts)
        out = first.new_empty((n, *first.shape[1:-1], width))
    else:
        out = first.new_empty((n, *first.shape[1:]))
    for index, y in parts:
        out.index_copy_(0, index, torch.nn.functional.pad(y, (0, width - y.shape[-1])) if pad else y)
    return out


def current_mixed_batch() -> MixedBatch | None:
    """The mixed batch of the running forward call in this thread or task, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def mixed_batch(batch: MixedBatch) -> Iterator[None]:
    """Publish `batch` to every BitFit layer for the duration of one forward or generate call."""
    token = _CURRENT.set(batch)
    InFlight.add(1)
    try:
        yield
    finally:
        InFlight.add(-1)
        _CURRENT.reset(token)


def check_names(names: Sequence[str], known: Mapping[str, Any]) -> list[str]:
    """Validate `adapter_names`: a list of str, each a routable adapter or `"__base__"`."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per example, got {type(names).__name__}. "
            f'Example: adapter_names=["sst2", "{BASE}", "trec"].'
        )
    names = list(names)
    bad = sorted({n for n in names if n != BASE and n not in known})
    if bad:
        raise ValueError(
            f"Unknown adapter name(s) in adapter_names: {bad}. Resident adapters ({len(known)}): "
            f"{sorted(known)[:10]}{' ...' if len(known) > 10 else ''}; "
            f'use "{BASE}" for the base model.'
        )
    return names
