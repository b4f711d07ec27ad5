"""How the store splits one mixed batch into forwards: by length, across tasks, where padding costs more than a forward.

A mixed batch may put any rows side by side, whatever their tasks, so the store sorts a batch by length and cuts it
where the padded tokens saved pay for another forward. Grouping by task cannot do this (its sub-batches are fixed by
the tasks in the batch). The cost model: one forward costs `forward_cost` (in padded tokens) plus rows × its longest
row; `plan_chunks` finds the cheapest cut exactly (dynamic programming over the sorted lengths, O(n × max_rows)).

Measured on the 2-core CPU of docs/performance.md (`python -m benchmarks.chunking`, docs/serving.md): a forward of
the store on MiniLM costs about 14 ms + 0.31 ms per padded token on one thread (one forward ≈ 45 tokens); a batch
of 32 random SST-2 sentences costs 1.56× more in one forward than cut by this plan with the default cost of 32, and
costs between 16 and 64 are within 2 % of each other. On a GPU a forward's fixed cost dwarfs its tokens at these
sizes (not measured here), so the store keeps one forward per batch there unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["CPU_FORWARD_COST", "check_forward_cost", "plan_chunks"]

CPU_FORWARD_COST = 32.0
"""Default `forward_cost` on CPU, in padded tokens (see the module doc for the measurement)."""


def check_forward_cost(value: float, name: str = "forward_cost") -> None:
    """Refuse a forward cost that is not a number of tokens ≥ 0 (`math.inf` allowed), naming the setting `name`."""
    if not value >= 0:
        raise ValueError(f"{name} must be a number of tokens >= 0 (inf: one forward per batch), got {value}.")


def plan_chunks(lengths: Sequence[int], max_rows: int, forward_cost: float) -> list[tuple[int, int]]:
    """Cut rows sorted by length into `[start, end)` chunks of at most `max_rows` rows that minimise the sum over
    chunks of `forward_cost + rows × longest`. An infinite `forward_cost` gives chunks of `max_rows` rows.

    Args:
        lengths (`Sequence[int]`): row lengths in tokens, sorted ascending.
        max_rows (`int`): most rows in one chunk (at least 1).
        forward_cost (`float`): what one more forward costs, in padded tokens (at least 0).

    Example (two short rows and two long ones: padding the short ones to 50 would cost more than a second forward):

    >>> plan_chunks([5, 6, 48, 50], max_rows=64, forward_cost=30)
    [(0, 2), (2, 4)]
    >>> plan_chunks([5, 6, 48, 50], max_rows=64, forward_cost=1000)
    [(0, 4)]
    >>> plan_chunks([5, 6, 48, 50], max_rows=3, forward_cost=math.inf)
    [(0, 3), (3, 4)]
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}.")
    check_forward_cost(forward_cost)
    if any(b < a for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError("lengths must be sorted ascending: sort the rows by length before planning chunks.")
    n = len(lengths)
    if math.isinf(forward_cost):
        return [(i, min(i + max_rows, n)) for i in range(0, n, max_rows)]
    # best[j]: cheapest cost of rows [0, j); cut[j]: where the last chunk of that plan starts
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + forward_cost + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks = []
    j = n
    while j > 0:
        chunks.append((cut[j], j))
        j = cut[j]
    return chunks[::-1]
