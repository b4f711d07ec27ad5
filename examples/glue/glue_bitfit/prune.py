"""Sparse BitFit adapters by masked re-training: `train.py --keep-fraction F`.

Pruning a trained adapter to its largest-magnitude entries costs accuracy (MiniLM b_q + b_m2 on SST-2: about one
point at 40% kept). Here the pruned adapter is trained a short while longer (`--retrain-epochs`, default 1) with
the pruned positions held at exactly zero, so the kept deltas and the head can make up for the dropped ones; the
result is saved int8 and sparse (`BitFitConfig(save_dtype="int8", keep_fraction=F)`), which keeps exactly the same positions (the
largest-magnitude `F` of each delta tensor, the same selection rule as `compact.encode`).

`retrain` is a step of `train.run`, after the normal epochs (or, with `--init-adapter DIR`, instead of them:
`load_init_adapter` runs in `train.setup`). It calls `make_masks`, `apply_masks` (then again after every optimizer
step, through `Session.masks`), and the best re-trained epoch is saved by `save_compact`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

SAVE_DTYPE = "int8"
ADAPTER_FILE = "adapter_model.safetensors"


def kept_count(numel: int, keep_fraction: float) -> int:
    """How many entries of a tensor of `numel` entries are kept (the rule of `bitfit_peft.compact.encode`)."""
    return max(1, round(keep_fraction * numel)) if numel else 0


def delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable BitFit delta Parameters of `model` (every `BitFitLayer`'s active, trainable deltas)."""
    from bitfit_peft import BitFitLayer

    return [
        p
        for module in model.modules()
        if isinstance(module, BitFitLayer)
        for p in module.bitfit_delta.values()
        if p.requires_grad
    ]


def make_masks(model: nn.Module, keep_fraction: float) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """For each delta of `model`, a 0/1 mask (in its dtype) keeping the `keep_fraction` largest-magnitude entries."""
    masks = []
    for param in delta_parameters(model):
        flat = param.detach().flatten()
        mask = torch.zeros_like(flat)
        mask[flat.abs().topk(kept_count(flat.numel(), keep_fraction)).indices] = 1
        masks.append((param, mask.view_as(param)))
    if not masks:
        raise ValueError("--keep-fraction found no trainable BitFit deltas in the model: use it with --method bitfit.")
    return masks


@torch.no_grad()
def apply_masks(masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Zero the pruned entries in place (under no_grad, so the layers' cached biases see the version change)."""
    for param, mask in masks:
        param.mul_(mask)


def load_init_adapter(model: Any, adapter_dir: str) -> None:
    """Load the deltas and head of a saved adapter (float32 or compact) into the freshly built PeftModel `model`.

    Raises:
        ValueError: the directory holds no adapter file, or its tensors do not match the model's (another
            `--model`, `--task` or `--bias-terms` than the run that trained it).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from bitfit_peft import compact

    path = os.path.join(adapter_dir, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--init-adapter '{adapter_dir}' holds no {ADAPTER_FILE}: pass a train.py --output-dir.")
    state = compact.decode(load_file(path))
    expected = get_peft_model_state_dict(model)
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"--init-adapter '{adapter_dir}' does not fit this model (missing {missing[:2]}, unexpected {extra[:2]}, "
            "or other shapes): pass the --model, --task and --bias-terms of the run that trained it."
        )
    set_peft_model_state_dict(model, state)


def save_compact(model: Any, out_dir: str, keep_fraction: float) -> str:
    """Save `model`'s adapter with `BitFitConfig(save_dtype="int8", keep_fraction=keep_fraction)`; return the file.

    Deltas and head are stored int8, the deltas sparse (7,641 B for the MiniLM b_q + b_m2 SST-2 adapter at 0.4).
    """
    config = model.peft_config[model.active_adapter]
    # packed too: an earlier get_peft_model_state_dict of the float32 adapter recorded packed=False in the config.
    config.save_dtype, config.keep_fraction, config.packed = SAVE_DTYPE, keep_fraction, True
    model.save_pretrained(out_dir)
    return os.path.join(out_dir, ADAPTER_FILE)


def retrain(s: Any, state: Any) -> None:
    """Prune every delta to its largest-magnitude `--keep-fraction`, then train `--retrain-epochs` more with the
    pruned entries held at zero (fresh AdamW and linear schedule at `--retrain-lr`); the best re-trained epoch is
    saved compact. `state.pruning` records the dev metrics before and right after pruning."""
    from transformers import get_linear_schedule_with_warmup

    from .train import evaluate, say, score, train_one_epoch  # train imports this module: import its steps when run

    args = s.args
    before = score(s) if args.init_adapter else {k: v for k, v in state.dev[-1].items() if k not in ("epoch", "step")}
    s.masks = make_masks(s.accelerator.unwrap_model(s.model), args.keep_fraction)
    apply_masks(s.masks)
    kept = sum(int(m.sum()) for _, m in s.masks)
    total = sum(m.numel() for _, m in s.masks)
    state.pruning = {"keep_fraction": args.keep_fraction, "kept": kept, "deltas": total, "before": before}
    state.pruning["pruned"] = score(s)
    state.best = None  # the adapter saved is the best re-trained one, never a dense epoch
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.retrain_lr, weight_decay=args.weight_decay)
    s.optimizer = s.accelerator.prepare(optimizer)
    steps = s.steps_per_epoch * args.retrain_epochs
    s.scheduler = get_linear_schedule_with_warmup(s.optimizer, int(args.warmup_ratio * steps), steps)
    s.bar.reset(total=steps)
    first = state.completed_steps // s.steps_per_epoch
    say(s, f"pruned to {kept:,}/{total:,} deltas: " + " ".join(f"{k}={v:.4f}" for k, v in state.pruning["pruned"].items()))  # fmt: skip
    for epoch in range(first, first + args.retrain_epochs):
        train_one_epoch(s, state, epoch)
        evaluate(s, state, epoch)
