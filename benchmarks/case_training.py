"""Case 1: cost of one training step (forward + backward + AdamW step) of BitFit against the alternatives.

The floor is the same biases trained in place (requires_grad on the base biases, no wrapper): BitFit can only lose
to it by its wrapper's overhead. Full fine-tuning, peft LoRA r=8 (query/value) and peft BEFT (default targets, all
Linear) are what a user would pick instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .common import (
    Batch,
    Group,
    Settings,
    fmt_ratio,
    make_variant,
    run_groups,
    target,
    train_step_fn,
    trainable,
)
from .timing import paired_ratio

ALL = ("floor", "bitfit", "full", "lora", "beft", "beft-all")
DECODER = ("floor", "bitfit", "full", "lora")


def groups(settings: Settings) -> list[Group]:
    """(model, batch, seq, variants, repeats) of every group (BERT-base 32x128 is left out: tens of s per step)."""
    (b1, s1), (b2, s2) = settings.batches
    r = settings.repeats
    if settings.quick:  # CI: one encoder and both decoders, every variant, tiny
        return [
            ("bert-base", b1, s1, ALL, r),
            ("gpt2-shaped", b1, s1, DECODER, r),
            ("llama-shaped", b1, s1, DECODER, r),
        ]
    return [
        ("bert-base", b1, s1, ALL, min(r, 3)),
        ("minilm", b1, s1, ALL, r),
        ("minilm", b2, s2, ("floor", "bitfit", "full", "lora"), min(r, 3)),
        ("gpt2-shaped", b1, s1, DECODER, r),
        ("llama-shaped", b1, s1, DECODER, r),
    ]


def _prepare(kind: str, model_name: str, base: nn.Module, data: Batch) -> tuple[Callable[[], None], dict[str, str]]:
    model = make_variant(kind, model_name, base)
    return train_step_fn(model, data), {"trainable params": f"{sum(p.numel() for p in trainable(model)):,}"}


def _targets(where: str, res: dict[str, Any], columns: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    if "bitfit" in res["times"] and "full" in res["times"]:
        res["bitfit_vs_full"] = paired_ratio(res, "bitfit", "full")
        columns["bitfit"]["bitfit / full"] = fmt_ratio(res["bitfit_vs_full"])
    return [
        target(f"training: bitfit ≤ 1.05× floor ({where})", res["ratios"].get("bitfit"), 1.05),
        target(f"training: bitfit ≤ 0.70× full fine-tuning ({where})", res.get("bitfit_vs_full"), 0.70),
    ]


def run(settings: Settings) -> dict[str, Any]:
    return run_groups(
        settings,
        groups(settings),
        title="Training step (forward + backward + AdamW)",
        baseline="floor",
        prepare=_prepare,
        targets=_targets,
        notes=[
            "Every variant is a deep copy of the same randomly initialised (or pretrained, MiniLM) model; loss = LM loss "
            "(decoders) or mean square of hidden states + pooler output (encoders), so every bias receives a gradient.",
            "BERT-base runs at 8×128 only, with at most 3 recorded rounds (one step takes seconds to tens of seconds on "
            "a shared 2-core CPU); the 32×128 shape is measured on the real MiniLM encoder instead.",
        ],
    )
