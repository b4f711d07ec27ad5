"""Case 3: inference latency of the base model against BitFit unmerged, BitFit merged, peft BEFT and peft LoRA.

"Unmerged" is the served form when several tasks share a base: the delta is folded into the layer's own bias
argument on every call. "Merged" is `merge_and_unload()`: a plain model with edited biases, which should cost exactly
what the base costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .common import Batch, Group, Settings, forward_fn, make_variant, randomize_adapters, run_groups, target

ALL = ("base", "bitfit", "bitfit-merged", "beft", "lora")
DECODER = ("base", "bitfit", "bitfit-merged", "lora")


def groups(settings: Settings) -> list[Group]:
    (b1, s1), (b2, s2) = settings.batches
    r = settings.repeats
    if settings.quick:
        return [
            ("bert-base", b1, s1, ALL, r),
            ("gpt2-shaped", b1, s1, DECODER, r),
            ("llama-shaped", b1, s1, DECODER, r),
        ]
    return [
        ("bert-base", b1, s1, ALL, r),
        ("minilm", b1, s1, ALL, 2 * r),
        ("minilm", b2, s2, ALL, r + 1),
        ("gpt2-shaped", b1, s1, DECODER, 2 * r),
        ("llama-shaped", b1, s1, DECODER, 2 * r),
    ]


def build(kind: str, model_name: str, base: nn.Module) -> Any:
    """The inference model for `kind`, adapters filled with small random values."""
    if kind == "base":
        return make_variant("frozen", model_name, base)
    peft_kind = kind.removesuffix("-merged")
    model = make_variant(peft_kind, model_name, base)
    randomize_adapters(model)
    if kind.endswith("-merged"):
        model = model.merge_and_unload()
    return model


def _prepare(kind: str, model_name: str, base: nn.Module, data: Batch) -> tuple[Callable[[], None], dict[str, str]]:
    return forward_fn(build(kind, model_name, base), data), {}


def _targets(where: str, res: dict[str, Any], columns: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    return [
        target(f"inference: bitfit unmerged ≤ 1.03× base ({where})", res["ratios"].get("bitfit"), 1.03),
        target(f"inference: bitfit merged ≈ 1.00× base, ≤ 1.02 ({where})", res["ratios"].get("bitfit-merged"), 1.02),
    ]


def run(settings: Settings) -> dict[str, Any]:
    return run_groups(
        settings,
        groups(settings),
        title="Inference latency (one forward, inference_mode)",
        baseline="base",
        prepare=_prepare,
        targets=_targets,
        notes=[
            "Adapters get small random values so merged weights differ from the base. LoRA is r=8 on query/value "
            "(c_attn on GPT-2, q_proj/v_proj on Llama), unmerged; BEFT uses peft's default targets (value projections).",
            "'≈ 1.00×' for merged is checked as ≤ 1.02× to leave room for noise. BERT-base runs at 8×128 only (a "
            "32×128 forward takes seconds on a shared 2-core CPU); the 32×128 shape is measured on the real MiniLM.",
        ],
    )
