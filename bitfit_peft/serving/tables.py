"""The store's delta tables for serving many tasks: rows written straight from adapter files, no peft injection.

Each BitFit layer of the served model gets one `LayerTable` (the same type the peft-model router builds) with a row
per task that touches it (row 0 stays zeros) and a slot -> row lookup, so a mixed batch costs one gather and one add
per layer, as in `BitFitLayer._mixed_forward`. This module owns what is per model rather than per layer: the task
slots (the same numbering on every layer), freed slots reused, and lookups grown by a quarter when slots run out.
"""

from __future__ import annotations

import torch

from ..layer import BitFitLayer
from ..routing import Routing
from ..tables import GROWTH, LayerTable


class Tables:
    """The per-layer tables of one served model, kept inside a `Routing` that the layers read.

    Not thread-safe by itself: the store calls it under its writer lock.

    Args:
        layers (`dict[str, BitFitLayer]`): module path -> layer (more may be added later: assign `layers` again).
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

    def _entry(self, key: str) -> LayerTable:
        layer = self.layers[key]
        entry = self.routing.tables.get(layer)
        if entry is None:
            device = next(layer.base_layer.parameters()).device
            entry = LayerTable.empty(layer._shape, self.dtype, device, slots=self.capacity)
            self.routing.tables[layer] = entry
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
                entry.grow_slots(self.capacity)
        return slot

    def reserve(self, rows_per_layer: dict[str, int]) -> None:
        """Allocate table rows for a bulk load up front (one allocation per layer instead of repeated growth)."""
        for key, extra in rows_per_layer.items():
            self._entry(key).reserve(extra)

    def put(self, name: str, deltas: dict[str, torch.Tensor]) -> None:
        """Write task `name`'s full-width deltas (module path -> tensor); replaces its rows if it has any."""
        slot = self._slot(name)
        for key in set(self._layers_of(name)) - set(deltas):  # a replacement that no longer touches a layer
            self.routing.tables[self.layers[key]].clear(name, slot)
        for key, delta in deltas.items():
            self._entry(key).put(name, slot, delta)
        self.routing.slots[name] = slot

    def _layers_of(self, name: str) -> list[str]:
        tables = self.routing.tables
        return [k for k, layer in self.layers.items() if layer in tables and name in tables[layer].rows]

    def remove(self, name: str) -> None:
        """Free task `name`'s slot and rows."""
        slot = self.routing.slots[name]
        for key in self._layers_of(name):
            self.routing.tables[self.layers[key]].clear(name, slot)
        self.free_slots.append(self.routing.slots.pop(name))

    def nbytes(self) -> int:
        """Bytes held by the tables and lookups."""
        return sum(entry.nbytes() for entry in self.routing.tables.values())
