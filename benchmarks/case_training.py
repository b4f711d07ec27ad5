"""Case 1: cost of one training step (forward + backward + AdamW step) of BitFit against the alternatives.

The floor is the same biases trained in place (requires_grad on the base biases, no wrapper): BitFit can only lose
to it by its wrapper's overhead. Full fine-tuning, peft LoRA r=8 (query/value) and peft BEFT (default targets, all
Linear) are what a user would pick instead.
"""

from __future__ import annotations

import gc
from typing import Any

from .common import (
    MODELS,
    Settings,
    bitfit_missing,
    fmt_ratio,
    make_batch,
    make_variant,
    target,
    timing_table,
    train_step_fn,
    trainable,
)
from .timing import interleaved, paired_ratio

ALL = ("floor", "bitfit", "full", "lora", "beft", "beft-all")
DECODER = ("floor", "bitfit", "full", "lora")


def groups(settings: Settings) -> list[tuple[str, int, int, tuple[str, ...], int]]:
    """(model, batch, seq, variants, repeats) of every group (BERT-base 32x128 is left out: ~40 s per step here)."""
    (b1, s1), (b2, s2) = settings.batches
    r = settings.repeats
    if settings.quick:  # CI: one encoder and both decoders, every variant, tiny
        return [
            ("bert-base", b1, s1, ALL, r),
            ("gpt2-shaped", b1, s1, DECODER, r),
            ("llama-shaped", b1, s1, DECODER, r),
        ]
    return [
        ("bert-base", b1, s1, ALL, 3),
        ("minilm", b1, s1, ALL, r),
        ("minilm", b2, s2, ("floor", "bitfit", "full", "lora"), 3),
        ("gpt2-shaped", b1, s1, DECODER, r),
        ("llama-shaped", b1, s1, DECODER, r),
    ]


def run_group(settings: Settings, model_name: str, batch: int, seq: int, kinds: tuple[str, ...], repeats: int) -> dict:
    """Time `kinds` on one model and batch shape, interleaved, against the floor."""
    missing = bitfit_missing()
    base = MODELS[model_name](settings)
    data = make_batch(base, batch, seq)
    steps, params, skipped = {}, {}, {}
    for kind in kinds:
        if kind == "bitfit" and missing:
            skipped[kind] = missing
            continue
        model = make_variant(kind, model_name, base)
        steps[kind] = train_step_fn(model, data)
        params[kind] = sum(p.numel() for p in trainable(model))
    del base
    gc.collect()
    result = interleaved(steps, baseline="floor", warmup=settings.warmup, repeats=repeats)
    if "bitfit" in steps:
        result["bitfit_vs_full"] = paired_ratio(result, "bitfit", "full")
    return {"model": model_name, "batch": batch, "seq": seq, "timing": result, "params": params, "skipped": skipped}


def run(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"title": "Training step (forward + backward + AdamW)", "groups": [], "tables": []}
    targets = []
    for model_name, batch, seq, kinds, repeats in groups(settings):
        g = run_group(settings, model_name, batch, seq, kinds, repeats)
        out["groups"].append(g)
        res = g["timing"]
        extra = {k: {"trainable params": f"{n:,}"} for k, n in g["params"].items()}
        if "bitfit_vs_full" in res:
            extra["bitfit"]["bitfit / full"] = fmt_ratio(res["bitfit_vs_full"])
        out["tables"].append(timing_table(f"{model_name} {batch}×{seq}", res, extra))
        where = f"{model_name} {batch}×{seq}"
        targets.append(target(f"training: bitfit ≤ 1.05× floor ({where})", res["ratios"].get("bitfit"), 1.05))
        targets.append(target(f"training: bitfit ≤ 0.70× full fine-tuning ({where})", res.get("bitfit_vs_full"), 0.70))
    out["targets"] = targets
    out["notes"] = [
        "Every variant is a deep copy of the same randomly initialised (or pretrained, MiniLM) model; loss = LM loss "
        "(decoders) or mean square of hidden states + pooler output (encoders), so every bias receives a gradient.",
        "BERT-base runs at 8×128 only, with 3 recorded rounds: one step takes 6–15 s on this shared 2-core box "
        "(32×128: ~40 s), so the 32×128 shape is measured on the real MiniLM encoder instead.",
    ]
    return out
