"""Interleaved timing: run every variant once per round (A B C, C B A, ...), then report medians and paired ratios.

Why interleaved and paired: on a shared machine the speed drifts by tens of percent over a minute. Running the
variants round-robin puts each one under the same drift, and the ratio of each round's pair (variant / baseline)
cancels most of what remains. The order is reversed every other round so no variant always runs right after the
same neighbour (cache state, thermal state). Warm-up rounds are run the same way and discarded.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Stats:
    """Median, min and max of a list of samples (seconds, or a unitless ratio)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("Stats.of needs at least one sample; got an empty list.")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes, with the garbage collector held off during the call."""
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    warmup: int,
    repeats: int,
    setups: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Time `fns` round-robin and compare each to `baseline` measured in the same rounds.

    Args:
        fns: name -> zero-argument callable doing one unit of work (one step, one forward).
        baseline: the name in `fns` every ratio is taken against.
        warmup: rounds run first and discarded.
        repeats: rounds recorded.
        setups: name -> callable run (untimed) right before each call of that variant, e.g. to select an adapter.

    Returns:
        `{"baseline", "warmup", "repeats", "times": {name: Stats}, "ratios": {name: Stats}, "samples": {name: [s]}}`
        where each ratio's samples are the per-round `time(name) / time(baseline)`; all Stats as plain dicts.

    >>> out = interleaved({"a": lambda: None, "b": lambda: None}, baseline="a", warmup=1, repeats=3)
    >>> out["ratios"]["a"]["median"]
    1.0
    """
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of the timed variants {list(fns)}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        gc.collect()
        for name in order:
            if setups and name in setups:
                setups[name]()
            seconds = time_call(fns[name])
            if round_index >= warmup:
                samples[name].append(seconds)
    base = samples[baseline]
    ratios = {name: Stats.of([t / b for t, b in zip(samples[name], base, strict=True)]) for name in names}
    return {
        "baseline": baseline,
        "warmup": warmup,
        "repeats": repeats,
        "times": {name: Stats.of(samples[name]).to_dict() for name in names},
        "ratios": {name: stats.to_dict() for name, stats in ratios.items()},
        "samples": samples,
    }


def paired_ratio(result: dict[str, Any], name: str, other: str) -> dict[str, float]:
    """Per-round `time(name) / time(other)` of an `interleaved` result, as Stats (any pair, not just the baseline)."""
    a, b = result["samples"][name], result["samples"][other]
    return Stats.of([x / y for x, y in zip(a, b, strict=True)]).to_dict()


def repeat_timing(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict[str, float]:
    """Median/min/max seconds of `fn` alone (for costs with no natural baseline, such as a hotswap)."""
    for _ in range(warmup):
        fn()
    return Stats.of([time_call(fn) for _ in range(repeats)]).to_dict()
