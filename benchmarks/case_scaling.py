"""Case 6: how training and inference cost grow with sequence length and batch size, and memory with resident adapters.

Each point compares BitFit to its floor (training) or to the base model (inference) in the same interleaved rounds,
so the ratio columns show whether BitFit's overhead is a fixed cost (shrinking with size) or proportional.
"""

from __future__ import annotations

import gc
from typing import Any

from .common import (
    MODELS,
    Settings,
    bitfit_missing,
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    forward_fn,
    make_batch,
    make_variant,
    randomize_adapters,
    rss_bytes,
    tensor_bytes,
    train_step_fn,
    trim_heap,
)
from .timing import interleaved

MODEL = "minilm"


def points(settings: Settings) -> list[tuple[int, int]]:
    """(batch, seq): a sequence-length sweep at batch 8 (2 in quick mode) and a batch sweep at the middle length."""
    b_mid = settings.scaling_batches[len(settings.scaling_batches) // 2]
    s_mid = settings.scaling_seqs[len(settings.scaling_seqs) // 2]
    pts = [(b_mid, s) for s in settings.scaling_seqs] + [(b, s_mid) for b in settings.scaling_batches]
    return list(dict.fromkeys(pts))


def cost_point(settings: Settings, base: Any, batch: int, seq: int, with_bitfit: bool) -> dict[str, Any]:
    data = make_batch(base, batch, seq)
    steps = {"floor": train_step_fn(make_variant("floor", MODEL, base), data)}
    steps["full"] = train_step_fn(make_variant("full", MODEL, base), data)
    fwd = {"base": forward_fn(make_variant("frozen", MODEL, base), data)}
    if with_bitfit:
        steps["bitfit"] = train_step_fn(make_variant("bitfit", MODEL, base), data)
        model = make_variant("bitfit", MODEL, base)
        randomize_adapters(model)
        fwd["bitfit"] = forward_fn(model, data)
    train = interleaved(steps, baseline="floor", warmup=settings.warmup, repeats=max(2, settings.repeats - 1))
    infer = interleaved(fwd, baseline="base", warmup=settings.warmup, repeats=2 * settings.repeats)
    gc.collect()
    return {"batch": batch, "seq": seq, "train": train, "infer": infer}


def resident_memory(settings: Settings) -> dict[str, Any]:
    """RSS and tensor bytes as BitFit adapters (all biases) are added with add_adapter, against their payload."""
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig

    base = MODELS[MODEL](settings)
    gc.collect()
    trim_heap()
    rss0 = rss_bytes()
    model = get_peft_model(base, BitFitConfig(), adapter_name="a0")
    payload = tensor_bytes(p for n, p in model.named_parameters() if n.endswith(".a0"))
    rows, count = [], 1
    for n in settings.resident_ns:
        while count < n:
            model.add_adapter(f"a{count}", BitFitConfig())
            count += 1
        gc.collect()
        trim_heap()
        grown = rss_bytes() - rss0
        rows.append({"n": n, "rss_over_base": grown, "payload_total": n * payload, "per_adapter_rss": grown / n})
    return {"payload_bytes": payload, "rows": rows}


def run(settings: Settings) -> dict[str, Any]:
    missing = bitfit_missing()
    base = MODELS[MODEL](settings)
    pts = [cost_point(settings, base, b, s, not missing) for b, s in points(settings)]
    rows = []
    for p in pts:
        tr, inf = p["train"], p["infer"]
        rows.append([
            f"{p['batch']}×{p['seq']}", fmt_time(tr["times"]["floor"]), fmt_ratio(tr["ratios"].get("bitfit")),
            fmt_ratio(tr["ratios"]["full"]), fmt_time(inf["times"]["base"]), fmt_ratio(inf["ratios"].get("bitfit")),
        ])  # fmt: skip
    cols = ["batch×seq", "train floor", "train bitfit/floor", "train full/floor", "infer base", "infer bitfit/base"]
    tables = [
        {"title": f"Cost vs batch and sequence length ({MODEL}, median (min–max))", "columns": cols, "rows": rows}
    ]
    out: dict[str, Any] = {"title": "Scaling", "points": pts, "tables": tables, "targets": [], "notes": []}
    if missing:
        out["skipped"] = {"bitfit": missing}
        return out
    mem = resident_memory(settings)
    out["resident_memory"] = mem
    tables.append({
        "title": f"Memory vs resident adapters ({MODEL}, all biases, payload {fmt_bytes(mem['payload_bytes'])} each)",
        "columns": ["N", "RSS over base model", "N × payload", "RSS per adapter", "per adapter / payload"],
        "rows": [[f"{r['n']:,}", fmt_bytes(r["rss_over_base"]), fmt_bytes(r["payload_total"]),
                  fmt_bytes(r["per_adapter_rss"]), f"{r['per_adapter_rss'] / mem['payload_bytes']:.2f}"]
                 for r in mem["rows"]],
    })  # fmt: skip
    out["notes"].append(
        "RSS is read after gc + malloc_trim; small N is dominated by allocator granularity (one page per tensor)."
    )
    return out
