"""Gradient checkpointing: the bias deltas get the same gradients with it as without it.

transformers' `gradient_checkpointing_enable()` (reentrant or not, before or after `get_peft_model`, with or without
`enable_input_require_grads`) on an encoder, two decoders (a fused GPT-2 Conv1D and a Llama with added biases) and
an encoder-decoder, dropout on: the recompute must see the same deltas and the same dropout masks, and a delta the
first (no-grad, for reentrant checkpointing) forward touched must still get its gradient in the recompute.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from models import CASES, Case
from peft import get_peft_model

import bitfit_peft
from bitfit_peft.layer import BitFitLayer

CHECKED = ("bert", "gpt2", "llama", "t5")
_CASES = [c for c in CASES if c.name in CHECKED]


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """One thread: the same reduction order in both runs, so the comparison can be tight."""


def _with_dropout(case: Case) -> Any:
    config = case.config()
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "attn_pdrop", "dropout_rate"):
        if hasattr(config, name):
            setattr(config, name, 0.1)
    return config


def _build(case: Case, where: str | None, reentrant: bool, input_grads: bool) -> torch.nn.Module:
    from models import build_model

    base = build_model(case.auto_class, _with_dropout(case), frozen=False)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        if where == "base":  # the usual order in scripts: the base first, then peft
            base.gradient_checkpointing_enable(**kwargs)
        config = bitfit_peft.BitFitConfig(task_type=case.task_type, init_weights=False, **case.bitfit_kwargs)
        model = get_peft_model(base, config)
        if where == "peft":  # what Trainer(gradient_checkpointing=True) does, on the peft model
            model.gradient_checkpointing_enable(**kwargs)
    if input_grads:
        model.enable_input_require_grads()
    return model.train()


def _batch(case: Case) -> dict[str, torch.Tensor]:
    batch = case.batch()
    if case.kind == "encoder":
        batch["labels"] = torch.arange(batch["input_ids"].shape[0]) % 3
    elif case.kind == "seq2seq":
        batch["labels"] = batch["decoder_input_ids"]
    else:
        batch["labels"] = batch["input_ids"]
    return batch


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Loss, the trainable parameters' gradients, and how many times the BitFit layers ran forward."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, BitFitLayer)]
    torch.manual_seed(123)  # the dropout masks
    loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls[0]


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
@pytest.mark.parametrize(
    ("where", "reentrant", "input_grads"),
    [
        ("peft", True, False),
        ("peft", True, True),
        ("peft", False, False),
        ("base", True, False),
        ("base", False, True),
    ],
)
def test_checkpointed_gradients_equal_plain(case: Case, where: str, reentrant: bool, input_grads: bool) -> None:
    batch = _batch(case)
    loss0, grads0, calls0 = _grads(_build(case, None, reentrant, False), batch)
    model = _build(case, where, reentrant, input_grads)
    loss, grads, calls = _grads(model, batch)
    # Checkpointing really ran: every checkpointed block ran its BitFit layers a second time in the backward.
    assert calls > calls0, f"no recompute: {calls} BitFit forwards with checkpointing, {calls0} without"
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    deltas = [n for n in grads0 if "bitfit_delta" in n]
    assert len(deltas) > 4, deltas
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient with checkpointing for {missing}"
    for name, grad in grads0.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient even without checkpointing"
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
