"""The bounded key/value store of continuous batching: a pool of token slots shared by every running request.

Each layer keeps one pool of `capacity` token slots for keys and one for values, `(capacity, kv_heads, head_dim)`.
A request reserves the slots of its prompt plus its `max_tokens` when it is admitted (`TokenPool.take`), so the
pool never runs out mid-generation, and gives them back when it leaves (`TokenPool.give`). Slots are single
tokens, so there is no fragmentation: any free slots serve any request.

One forward runs rows at different positions: `SlotCache` is a transformers `Cache` whose `update` writes each
row's new keys/values into that row's own slots and returns every row's keys/values gathered up to the longest
row (`(rows, kv_heads, length, head_dim)`); `attention_mask` is the matching additive 4D mask (a row sees its own
tokens up to its position, nothing past its length), which transformers' mask builders take as-is.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

__all__ = ["SlotCache", "TokenPool", "attention_mask"]


class TokenPool:
    """Free token slots, `capacity` in all; `take` and `give` are O(tokens) list operations.

    Example:

    >>> pool = TokenPool(8)
    >>> slots = pool.take(5)
    >>> pool.free, len(slots)
    (3, 5)
    >>> pool.give(slots)
    >>> pool.free
    8
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> torch.Tensor:
        """`n` free slots (the caller checked `free`)."""
        if n > len(self._free):
            raise RuntimeError(f"TokenPool.take({n}) with only {len(self._free)} free slots")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return torch.tensor(taken, dtype=torch.long)

    def give(self, slots: torch.Tensor) -> None:
        self._free.extend(slots.tolist())


class SlotCache(Cache):
    """Keys and values of every running request, in per-layer pools of token slots.

    Before each forward, `plan(write, read)` says where the rows' new tokens go (`write`: `(rows * new,)` slot
    numbers, row-major) and what each row attends to (`read`: `(rows, length)` slot numbers, padded with any
    slot: the mask hides the padding).

    Args:
        capacity (`int`): token slots per layer.
        layers (`int`): decoder layers.
        kv_heads (`int`), head_dim (`int`): the shape of one token's keys (and values) in one layer.
        dtype (`torch.dtype`), device (`torch.device`): of the model.
    """

    def __init__(
        self, capacity: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(layers=[])
        shape = (capacity, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._write = torch.zeros(0, dtype=torch.long)
        self._read = torch.zeros(0, 0, dtype=torch.long)
        self._seen = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def plan(self, write: torch.Tensor, read: torch.Tensor) -> None:
        device = self.keys[0].device
        self._write, self._read = write.to(device), read.to(device)
        self._flat = self._read.reshape(-1)
        self._seen = read.shape[1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the rows' new `(rows, kv_heads, new, head_dim)` keys/values into their slots; return every row's
        keys/values up to the longest row, `(rows, kv_heads, length, head_dim)`."""
        rows, heads, _, dim = key_states.shape
        out = []
        for pool, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            pool.index_copy_(0, self._write, new.transpose(1, 2).reshape(-1, heads, dim).to(pool.dtype))
            gathered = pool.index_select(0, self._flat).view(rows, self._seen, heads, dim)
            out.append(gathered.transpose(1, 2))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._seen

    def __len__(self) -> int:
        return len(self.keys)


def attention_mask(starts: list[int], new: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive `(rows, 1, new, length)` mask: row r's query i (at position `starts[r] + i`) sees keys 0 to
    `starts[r] + i`; the rest (later tokens, padding) gets the dtype's lowest value."""
    keys = torch.arange(length)
    queries = torch.tensor(starts).view(-1, 1, 1) + torch.arange(new).view(1, -1, 1)  # (rows, new, 1)
    allowed = keys.view(1, 1, -1) <= queries
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1).to(device)
