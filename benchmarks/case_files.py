"""Case 5: adapter files on disk, their overhead over the raw tensors, and how long loading and hotswapping take.

Sizes are exact byte counts of what `save_pretrained` writes for a BERT-base-shaped model. The payload is the sum of
the tensors' bytes read back from the safetensors header; the overhead is the rest of the file (the JSON header).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Any

from safetensors import safe_open

from .common import (
    Settings,
    bert_base,
    bitfit_missing,
    fmt_bytes,
    fmt_time,
    make_variant,
    randomize_adapters,
    target,
)
from .timing import repeat_timing

LOAD_BUDGET_S = 60.0  # wall time for loading many adapters; the count reached is reported
ST_NAME = "adapter_model.safetensors"
FILE_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("bitfit all biases fp32", "bitfit", {}),
    ("bitfit all biases bf16", "bitfit", {"save_dtype": "bfloat16"}),
    ("bitfit b_q+b_m2 fp32", "bitfit", {"bias_terms": ["query", "intermediate"]}),
    ("bitfit b_q+b_m2 bf16", "bitfit", {"bias_terms": ["query", "intermediate"], "save_dtype": "bfloat16"}),
    ("lora r=8 q,v", "lora", {}),
    ("beft default (value)", "beft", {}),
    ("beft all-linear", "beft-all", {}),
)


def payload_bytes(path: str) -> tuple[int, int]:
    """(tensor bytes, tensor count) of a safetensors file, from its header."""
    total = count = 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(key)
            total += t.numel() * t.element_size()
            count += 1
    return total, count


def file_sizes(base: Any, root: str, missing: str | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows, paths = [], {}
    for label, kind, kw in FILE_VARIANTS:
        if kind == "bitfit" and missing:
            continue
        model = make_variant(kind, "bert-base", base, **kw)
        randomize_adapters(model)
        path = os.path.join(root, label.replace(" ", "_").replace(",", ""))
        model.save_pretrained(path)
        paths[label] = path
        st = os.path.getsize(os.path.join(path, ST_NAME))
        cfg = os.path.getsize(os.path.join(path, "adapter_config.json"))
        payload, count = payload_bytes(os.path.join(path, ST_NAME))
        rows.append({"variant": label, "safetensors_bytes": st, "config_bytes": cfg, "payload_bytes": payload,
                     "tensors": count, "overhead": (st - payload) / payload})  # fmt: skip
    return rows, paths


def load_times(base: Any, paths: dict[str, str], settings: Settings, missing: str | None) -> dict[str, Any]:
    """Load-to-active (load_adapter + set_adapter) per method, loading many BitFit adapters, and hotswaps."""
    out: dict[str, Any] = {}
    counter = iter(range(10**9))

    def loader(model: Any, path: str) -> Any:
        def load() -> None:
            name = f"x{next(counter)}"
            model.load_adapter(path, adapter_name=name)
            model.set_adapter(name)

        return load

    reps = max(3, settings.repeats)
    for label, kind in (
        ("lora r=8 q,v", "lora"),
        ("beft default (value)", "beft"),
        ("bitfit all biases fp32", "bitfit"),
    ):
        if kind == "bitfit" and missing:
            continue
        model = make_variant(kind, "bert-base", base)
        out[f"load-to-active {label}"] = repeat_timing(loader(model, paths[label]), warmup=1, repeats=reps)
        if kind == "lora":
            from peft.utils.hotswap import hotswap_adapter as peft_hotswap

            other = paths[label]
            out["hotswap lora r=8 q,v (peft)"] = repeat_timing(
                lambda m=model, p=other: peft_hotswap(m, p, adapter_name="default"), warmup=1, repeats=reps
            )
        if kind == "bitfit":
            from bitfit_peft import hotswap_adapter

            fresh = make_variant("bitfit", "bert-base", base)
            path = paths[label]
            out["hotswap bitfit, 1 resident"] = repeat_timing(
                lambda m=fresh, p=path: hotswap_adapter(m, p, adapter_name="default"), warmup=1, repeats=reps
            )
            # Many adapters: load until settings.load_many are resident or the budget is spent.
            many, marks, start, loaded = make_variant("bitfit", "bert-base", base), {}, time.perf_counter(), 0
            load = loader(many, path)
            while loaded < settings.load_many and time.perf_counter() - start < LOAD_BUDGET_S:
                t0 = time.perf_counter()
                load()
                loaded += 1
                if loaded in (1, 10, 100, 1000) or loaded % 250 == 0:
                    marks[str(loaded)] = {
                        "elapsed_s": time.perf_counter() - start,
                        "this_load_s": time.perf_counter() - t0,
                    }
            out["load many"] = {"target": settings.load_many, "loaded": loaded, "seconds": time.perf_counter() - start,
                                "marks": marks}  # fmt: skip
            out[f"hotswap bitfit, {loaded + 1} resident"] = repeat_timing(
                lambda m=many, p=path: hotswap_adapter(m, p, adapter_name="default"), warmup=1, repeats=reps
            )
            del many, fresh
    return out


def run(settings: Settings) -> dict[str, Any]:
    missing = bitfit_missing()
    base = bert_base(settings)
    with tempfile.TemporaryDirectory() as root:
        sizes, paths = file_sizes(base, root, missing)
        times = load_times(copy.deepcopy(base), paths, settings, missing)
    size_rows = [[r["variant"], f"{r['tensors']}", fmt_bytes(r["payload_bytes"]), f"{r['safetensors_bytes']:,} B",
                  f"{r['config_bytes']:,} B", f"{100 * r['overhead']:.2f} %"] for r in sizes]  # fmt: skip
    time_rows = [[k, fmt_time(v)] for k, v in times.items() if k != "load many"]
    targets = [
        target(
            f"file overhead ≤ 5% ({r['variant']})",
            {"median": r["overhead"], "min": r["overhead"], "max": r["overhead"]},
            0.05,
            "safetensors JSON header: one entry per tensor",
        )  # fmt: skip
        for r in sizes
        if r["variant"].startswith("bitfit")
    ]
    many = times.get("load many")
    tables = [
        {"title": "Adapter files (BERT-base)", "rows": size_rows,
         "columns": ["adapter", "tensors", "payload", "safetensors file", "adapter_config.json", "file overhead"]},
        {"title": "Load and hotswap (BERT-base) — median (min–max)", "columns": ["operation", "time"],
         "rows": time_rows},
    ]  # fmt: skip
    if many:
        tables.append({
            "title": f"Loading many BitFit adapters (all biases): {many['loaded']:,} of {many['target']:,} in "
                     f"{many['seconds']:.1f} s (budget {LOAD_BUDGET_S:.0f} s)",
            "columns": ["adapters resident", "elapsed", "time of that load"],
            "rows": [[k, f"{v['elapsed_s']:.2f} s", f"{1e3 * v['this_load_s']:.1f} ms"] for k, v in many["marks"].items()],
        })  # fmt: skip
    return {
        "title": "Adapter files, loading and hotswap",
        "sizes": sizes,
        "times": times,
        "tables": tables,
        "targets": targets,
        "skipped": {"bitfit": missing} if missing else {},
        "notes": [
            "load-to-active = `load_adapter(path, adapter_name=new)` + `set_adapter(new)` on a model that "
            "already holds one adapter of the same method."
        ],  # fmt: skip
    }
