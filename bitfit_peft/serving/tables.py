"""Packed delta tables for serving many tasks: rows written straight from adapter files, no peft injection.

Each BitFit layer of the served model gets one table with a row per task that touches it (row 0 stays zeros) and a
slot -> row lookup, so a mixed batch costs one gather and one add per layer, as in `BitFitLayer._mixed_forward`.
Capacity grows by a quarter when full, so resident memory stays close to the payload.
"""

from __future__ import annotations

import torch

from ..layer import BitFitLayer
from ..routing import LayerTable, Routing

GROWTH = 1.25


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


class Tables:
    """The per-layer tables of one served model, kept inside a `Routing` that the layers read.

    Not thread-safe by itself: the store calls it under its writer lock.

    Args:
        layers (`dict[str, BitFitLayer]`): module path -> layer.
        routing (`Routing`): the snapshot the layers read; its `tables` and `slots` are updated in place.
        dtype (`torch.dtype`): table dtype (the model's).
        capacity (`int`): tasks to allocate for up front.
    """

    def __init__(self, layers: dict[str, BitFitLayer], routing: Routing, dtype: torch.dtype, capacity: int) -> None:
        self.layers = layers
        self.routing = routing
        self.dtype = dtype
        self.capacity = max(1, capacity)
        self.free_slots: list[int] = []
        self.next_slot = 1
        self.free_rows: dict[str, list[int]] = {k: [] for k in layers}
        self.next_row: dict[str, int] = {}

    def _entry(self, key: str) -> LayerTable:
        layer = self.layers[key]
        entry = self.routing.tables.get(layer)
        if entry is None:
            device = next(layer.base_layer.parameters()).device
            table = torch.zeros((1, *layer._shape), dtype=self.dtype, device=device)
            lookup = torch.zeros(self.capacity + 1, dtype=torch.long, device=device)
            entry = self.routing.tables[layer] = LayerTable(table, lookup, {})
        return entry

    def _slot(self, name: str) -> int:
        slot = self.routing.slots.get(name)
        if slot is not None:
            return slot
        slot = self.free_slots.pop() if self.free_slots else self.next_slot
        if slot == self.next_slot:
            self.next_slot += 1
        if slot > self.capacity:
            self.capacity = max(slot, int(self.capacity * GROWTH) + 1)
            for entry in self.routing.tables.values():
                assert entry.lookup is not None
                entry.lookup = _grow(entry.lookup, self.capacity + 1)
        return slot

    def reserve(self, rows_per_layer: dict[str, int]) -> None:
        """Allocate table rows for a bulk load up front (one allocation per layer instead of repeated growth)."""
        for key, extra in rows_per_layer.items():
            entry = self._entry(key)
            used = self.next_row.get(key, 1) + max(0, extra - len(self.free_rows[key]))
            if used > entry.table.shape[0]:
                entry.table = _grow(entry.table, used)

    def put(self, name: str, deltas: dict[str, torch.Tensor]) -> None:
        """Write task `name`'s full-width deltas (module path -> tensor); replaces its rows if it has any."""
        slot = self._slot(name)
        for key in set(self._layers_of(name)) - set(deltas):  # a replacement that no longer touches a layer
            self._drop_row(key, name)
        for key, delta in deltas.items():
            entry = self._entry(key)
            row = entry.rows.get(name)
            if row is None:
                free = self.free_rows[key]
                row = free.pop() if free else self.next_row.get(key, 1)
                if not free:
                    self.next_row[key] = max(self.next_row.get(key, 1), row + 1)
                if row >= entry.table.shape[0]:
                    entry.table = _grow(entry.table, max(row + 1, int(entry.table.shape[0] * GROWTH) + 1))
                entry.rows[name] = row
            entry.table[row] = delta.to(device=entry.table.device, dtype=self.dtype)
            assert entry.lookup is not None
            entry.lookup[slot] = row
        self.routing.slots[name] = slot

    def _layers_of(self, name: str) -> list[str]:
        return [k for k, layer in self.layers.items() if name in self.routing.tables.get(layer, _EMPTY).rows]

    def _drop_row(self, key: str, name: str) -> None:
        entry = self.routing.tables[self.layers[key]]
        row = entry.rows.pop(name)
        entry.table[row] = 0
        assert entry.lookup is not None
        entry.lookup[self.routing.slots[name]] = 0
        self.free_rows[key].append(row)

    def remove(self, name: str) -> None:
        """Free task `name`'s slot and rows."""
        for key in self._layers_of(name):
            self._drop_row(key, name)
        self.free_slots.append(self.routing.slots.pop(name))

    def nbytes(self) -> int:
        """Bytes held by the tables and lookups."""
        return sum(
            e.table.numel() * e.table.element_size() + (0 if e.lookup is None else e.lookup.numel() * 8)
            for e in self.routing.tables.values()
        )


_EMPTY = LayerTable(torch.zeros(0), None, {})
