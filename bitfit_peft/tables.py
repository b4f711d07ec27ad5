"""`LayerTable`: one layer's packed per-adapter deltas, the table every mixed-batch call gathers from.

One type with one set of write rules (`put` / `clear` / `grow` / `reserve`) for both owners: the peft-model router
(`router`: a fresh, exactly sized table per routing snapshot) and the serving store (`serving.tables`: one
long-lived table per layer, written incrementally as tasks come and go). A layer reads it with `gather`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GROWTH", "LayerTable"]

GROWTH = 1.25  # a full table grows by a quarter: resident memory stays close to the payload


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


@dataclass(eq=False)
class LayerTable:
    """One layer's packed deltas, the one table type every mixed call reads: row 0 is zeros, one row per adapter
    that touches the layer, and a slot -> row lookup.

    Both owners write it only through `put` / `clear` / `grow` / `reserve`: the peft-model router (a fresh table per
    snapshot, sized exactly) and the serving store (one long-lived table, written incrementally, freed rows reused).
    Not thread-safe by itself: writers hold their model's writer lock, and calls (the readers) only `gather`.

    Args:
        table (`torch.Tensor`): `(rows, *bias_shape)`.
        lookup (`torch.Tensor`, *optional*): global slot -> row; None when rows are numbered by slot.
        rows (`dict[str, int]`): adapter -> row.

    Example:

    >>> t = LayerTable.empty((2,), torch.float32, torch.device("cpu"), slots=3)
    >>> t.put("a", 3, torch.tensor([1.0, 2.0]))
    1
    >>> t.gather(torch.tensor([0, 3])).tolist()
    [[0.0, 0.0], [1.0, 2.0]]
    """

    table: torch.Tensor
    lookup: torch.Tensor | None
    rows: dict[str, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)  # cleared rows, reused before new ones
    next_row: int = 1  # one past the highest row ever used

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, rows: int = 1, slots: int | None = None
    ) -> LayerTable:
        """A table of `rows` zero rows (row 0 included) and, unless `slots` is None, a lookup for slots 0..slots."""
        table = torch.zeros((max(1, rows), *shape), dtype=dtype, device=device)
        lookup = None if slots is None else torch.zeros(slots + 1, dtype=torch.long, device=device)
        return cls(table, lookup)

    def grow(self, rows: int) -> None:
        """Make room for `rows` rows (row 0 included); existing rows keep their values."""
        if rows > self.table.shape[0]:
            self.table = _grow(self.table, rows)

    def grow_slots(self, slots: int) -> None:
        """Make the lookup cover slots 0..slots."""
        if self.lookup is not None and slots + 1 > self.lookup.shape[0]:
            self.lookup = _grow(self.lookup, slots + 1)

    def reserve(self, extra: int) -> None:
        """Room for `extra` more adapters without growing again (one allocation for a bulk load)."""
        self.grow(self.next_row + max(0, extra - len(self.free)))

    def put(self, name: str, slot: int, delta: torch.Tensor) -> int:
        """Write adapter `name`'s full-width delta into its row (a new one, or a freed one, if it has none) and
        point `slot` at it; returns the row."""
        row = self.rows.get(name)
        if row is None:
            row = self.free.pop() if self.free else self.next_row
            self.next_row = max(self.next_row, row + 1)
            if row >= self.table.shape[0]:
                self.grow(max(row + 1, int(self.table.shape[0] * GROWTH) + 1))
            self.rows[name] = row
        if self.lookup is not None:
            self.lookup[slot] = row
        elif row != slot:
            raise RuntimeError(f"A table without a lookup numbers rows by slot; {name!r} got row {row}, slot {slot}.")
        self.table[row] = delta.to(device=self.table.device, dtype=self.table.dtype)
        return row

    def clear(self, name: str, slot: int) -> None:
        """Zero adapter `name`'s row, point `slot` at row 0, and free the row for reuse."""
        row = self.rows.pop(name)
        self.table[row] = 0
        if self.lookup is not None:
            self.lookup[slot] = 0
        self.free.append(row)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The delta of each entry of `slots` (one per input row), `(len(slots), *bias_shape)`."""
        rows = slots if self.lookup is None else self.lookup.index_select(0, slots)
        return self.table.index_select(0, rows)

    def nbytes(self) -> int:
        """Bytes held by the table and its lookup."""
        lookup = 0 if self.lookup is None else self.lookup.numel() * self.lookup.element_size()
        return self.table.numel() * self.table.element_size() + lookup
