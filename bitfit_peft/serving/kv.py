"""The bounded key/value store of continuous batching: a pool of token slots shared by every running request.

Each layer keeps one pool of `capacity` token slots for keys and one for values, `(capacity, kv_heads, head_dim)`.
A request reserves the slots of its prompt plus its `max_tokens` when it is admitted (`TokenPool.take`), so the
pool never runs out mid-generation, and gives them back when it leaves (`TokenPool.give`). Slots are single
tokens, so there is no fragmentation: any free slots serve any request.

One forward runs rows at different positions: `SlotCache` is a transformers `Cache` whose `update` writes each
row's new keys/values into that row's own slots and returns every row's keys/values up to the longest row
(`(rows, kv_heads, length, head_dim)`): gathered from the slots for a prefill forward, read from a persistent
decode view (grown in place, a row gathered only when it joins) for a decode forward; `attention_mask` is the
matching additive 4D mask (a row sees its own tokens up to its position, nothing past its length; left padding
sees nothing real), which transformers' mask builders take as-is.
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
    """Keys and values of every running request, in per-layer pools of token slots, plus a decode view.

    A prefill forward (`plan`) writes each row's new tokens into its slots (`write`: `(rows * new,)` slot numbers,
    row-major; padding goes to the spare slot `capacity`) and gathers what each row attends to (`read`:
    `(rows, length)` slot numbers, padded with any slot: the mask hides the padding).

    A decode forward (`plan_decode`) reads the *decode view* instead: per layer, the decoding rows' keys and values
    laid out as one `(rows, kv_heads, length, head_dim)` batch that persists across steps. Each step writes only the
    new token of each row (into its slot and into the view), so nothing is gathered while the set of decoding rows
    stays the same. A row that leaves is replaced by the view's last row (one row copied), a row that joins is
    gathered once from its slots; the view grows in rows and positions as needed. It holds at most `capacity`
    padded tokens (so at most as much memory as the pool): a batch whose padded size would exceed that is gathered
    from the slots every step instead.

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
        self.capacity = capacity
        shape = (capacity + 1, kv_heads, head_dim)  # + the spare slot that padding tokens write to
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._write = torch.zeros(0, dtype=torch.long)
        self._flat = torch.zeros(0, dtype=torch.long)
        self._seen = 0
        self._view: list[torch.Tensor] = []  # per layer: keys then values, (rows_cap, kv_heads, length_cap, head_dim)
        self._view_rows: list[int] = []  # the key of each row of the view, in batch order
        self._columns: torch.Tensor | None = None  # each decode row's new position in the view, or None
        self._gather = True  # this forward reads from the slots (`_flat`), not from the view
        self._batch = torch.zeros(0, dtype=torch.long)  # decode step: 0..rows-1
        self.gathers = 0  # rows gathered from the slots into the view (for tests and profiling)
        self.gathered_steps = 0  # decode steps that gathered every row from the slots (a batch too big to keep)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self._view))

    def plan(self, write: torch.Tensor, read: torch.Tensor, view_writes: bool = False) -> None:
        """The next forward writes to `write` and attends to `read` (see the class docstring). With
        `view_writes`, its first rows are the decode rows just planned by `plan_decode`: the last new token of
        each is also written into the decode view, which stays current (a decode step fused with a prefill)."""
        device = self.keys[0].device
        self._write, self._flat = write.to(device), read.reshape(-1).to(device)
        self._seen = read.shape[1]
        self._gather = True
        if not view_writes:
            self._columns = None

    def plan_decode(self, keys: list[int], slots: list[torch.Tensor], positions: list[int]) -> tuple[list[int], int]:
        """Plan one decode forward of rows `keys` (any order; a key names one row for as long as it runs), each
        with its `slots` and the position of its new token. Returns the batch order (indices into `keys`) the
        forward must use and the length its mask must cover."""
        rows = len(keys)
        length = max(positions) + 1
        if rows * length > self.capacity:  # too big a padded batch to keep: gather this step
            self._view, self._view_rows = [], []
            self.gathered_steps += 1
            order = list(range(rows))
            self.plan(
                torch.stack([s[p] for s, p in zip(slots, positions, strict=True)]),
                torch.stack([_padded(s, p + 1, length) for s, p in zip(slots, positions, strict=True)]),
            )
            return order, length
        self._arrange(keys, slots, positions, length)
        where = {k: i for i, k in enumerate(keys)}
        order = [where[k] for k in self._view_rows]
        device = self.keys[0].device
        self._write = torch.stack([slots[i][positions[i]] for i in order]).to(device)
        self._columns = torch.tensor([positions[i] for i in order], device=device)
        self._batch = torch.arange(rows, device=device)
        self._seen = length
        self._gather = False
        return order, length

    def _arrange(self, keys: list[int], slots: list[torch.Tensor], positions: list[int], length: int) -> None:
        """Make the view hold exactly the rows `keys`: fill the places of rows that left with the last rows, gather
        the rows that joined, and grow it to `len(keys)` rows and `length` positions."""
        staying = set(keys)
        kept = [k for k in self._view_rows if k in staying]
        n = len(kept)
        holes = [i for i, k in enumerate(self._view_rows[:n]) if k not in staying]
        movers = [i for i, k in enumerate(self._view_rows) if i >= n and k in staying]
        if holes:
            device = self.keys[0].device
            to, frm = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            for t in self._view:
                t.index_copy_(0, to, t.index_select(0, frm))
            for h, m in zip(holes, movers, strict=True):
                self._view_rows[h] = self._view_rows[m]
        del self._view_rows[n:]
        known = set(kept)
        joining = [i for i, k in enumerate(keys) if k not in known]
        rows_cap = self._view[0].shape[0] if self._view else 0
        length_cap = self._view[0].shape[2] if self._view else 0
        if len(keys) > rows_cap or length > length_cap:
            self._grow(len(keys), length, n)
        if joining:
            self._join(n, [slots[i] for i in joining], [positions[i] for i in joining])
            self._view_rows.extend(keys[i] for i in joining)

    def _grow(self, rows: int, length: int, keep: int) -> None:
        """A bigger view (with headroom, within `capacity` tokens) holding the first `keep` rows of the old one."""
        old = self._view
        rows_cap = max(rows, old[0].shape[0] if old else 0)
        length_cap = max(length, old[0].shape[2] if old else 0)
        if rows_cap * length_cap * 2 <= self.capacity:  # headroom: fewer regrowths as rows join and lengthen
            length_cap = min(max(2 * length_cap, 32), self.capacity // rows_cap)
        _, heads, dim = self.keys[0].shape
        self._view = []
        for i, pool in enumerate([*self.keys, *self.values]):
            view = torch.zeros(rows_cap, heads, length_cap, dim, dtype=pool.dtype, device=pool.device)
            if old and keep:
                view[:keep, :, : old[i].shape[2]] = old[i][:keep]
            self._view.append(view)

    def _join(self, start: int, slots: list[torch.Tensor], positions: list[int]) -> None:
        """Gather the tokens before `positions` of the joining rows into view rows `start`, `start + 1`, ..."""
        length = max(positions)
        if length == 0:
            return
        read = torch.stack([_padded(s, p, length) for s, p in zip(slots, positions, strict=True)])
        flat = read.reshape(-1).to(self.keys[0].device)
        rows = len(slots)
        for i, pool in enumerate([*self.keys, *self.values]):
            gathered = pool.index_select(0, flat).view(rows, length, *pool.shape[1:]).transpose(1, 2)
            self._view[i][start : start + rows, :, :length] = gathered
        self.gathers += rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the rows' new `(rows, kv_heads, new, head_dim)` keys/values into their slots; return every row's
        keys/values up to the longest row (the mask's length), `(rows, kv_heads, length, head_dim)`."""
        rows, heads, _, dim = key_states.shape
        out = []
        layers = len(self.keys)
        for i, (pool, new) in enumerate(((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states))):
            new = new.to(pool.dtype)
            pool.index_copy_(0, self._write, new.transpose(1, 2).reshape(-1, heads, dim))
            if self._columns is not None:  # the decode rows' new (last) token, into the view
                view = self._view[i * layers + layer_idx]
                view[self._batch, :, self._columns] = new[: len(self._batch), :, -1]
            if self._gather:
                gathered = pool.index_select(0, self._flat).view(rows, self._seen, heads, dim)
                out.append(gathered.transpose(1, 2))
            else:
                out.append(view[:rows, :, : self._seen])  # a strided view: attention reads it without a copy
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._seen

    def __len__(self) -> int:
        return len(self.keys)


def attention_mask(firsts: list[int], new: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive `(rows, 1, new, length)` mask: row r's query i (at position `firsts[r] + i`) sees keys 0 to
    that position; the rest (later tokens, padding) gets the dtype's lowest value. A left-padded row has a negative
    first position: its padding queries see key 0 alone (their output is thrown away; no row is all masked)."""
    keys = torch.arange(length)
    queries = torch.tensor(firsts).view(-1, 1, 1) + torch.arange(new).view(1, -1, 1)  # (rows, new, 1)
    allowed = keys.view(1, 1, -1) <= queries.clamp(min=0)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1).to(device)


def _padded(slots: torch.Tensor, used: int, length: int) -> torch.Tensor:
    """The first `used` slots of a row, padded to `length` with its first slot (hidden by the mask)."""
    if used == length:
        return slots[:used]
    return torch.cat([slots[:used], slots[:1].expand(length - used)])
