"""Mixed-task batches: one adapter name per example, resolved once per call into slot indices.

`BitFitModel` turns `adapter_names=[...]` into a `MixedBatch` (the slot of each example; slot 0 is the base model)
and publishes it in a context variable for the duration of the call. Each `BitFitLayer` then gathers one row per
example from its packed table (see `BitFitLayer._mixed_table`): one gather per layer, whatever the number of
adapters in the batch or resident on the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

BASE = "__base__"

_CURRENT: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("bitfit_mixed_batch", default=None)


class InFlight:
    """How many mixed-batch calls are running (any thread). torch.compile cannot read a context variable, but it can
    guard on this plain value, so a compiled layer notices a mixed call and refuses it instead of ignoring it."""

    count = 0


_generations = itertools.count(1)


def new_generation() -> int:
    """A fresh number identifying one set of resident adapters (layers rebuild their tables when it changes)."""
    return next(_generations)


@dataclass
class MixedBatch:
    """Per-call routing: `names[i]` is the adapter of example i; `slots` numbers every resident adapter from 1.

    Args:
        names (`list[str]`): one adapter name per example (`"__base__"` for none).
        slots (`dict[str, int]`): slot of every resident adapter (the same numbering on every layer).
        generation (`int`): identifies `slots`; layers rebuild their tables when it changes.
        beams (`int`): beam-search width; layers seeing `len(names) * beams` rows repeat each name `beams` times.
        tokens (`int`, *optional*): tokens per row of the latest model input, for layers that see the batch
            flattened to (rows * tokens, features), batch-major (OPT's FFN).
    """

    names: list[str]
    slots: dict[str, int]
    generation: int
    beams: int = 1
    tokens: int | None = None
    unique: tuple[str, ...] = ()
    _rows: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unique = tuple(dict.fromkeys(n for n in self.names if n != BASE))

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
            slots = torch.tensor([self.slots.get(name, 0) for name in self.names], dtype=torch.long)
            rows = slots.repeat_interleave(repeat).to(device)
            self._rows[key] = rows
        return rows


def current_mixed_batch() -> MixedBatch | None:
    """The mixed batch of the running forward call, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def mixed_batch(batch: MixedBatch) -> Iterator[None]:
    """Publish `batch` to every BitFit layer for the duration of one forward or generate call."""
    token = _CURRENT.set(batch)
    InFlight.count += 1
    try:
        yield
    finally:
        InFlight.count -= 1
        _CURRENT.reset(token)


def check_names(names: Sequence[str], known: Mapping[str, int]) -> list[str]:
    """Validate `adapter_names`: a list of str, each a resident adapter or `"__base__"`."""
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
