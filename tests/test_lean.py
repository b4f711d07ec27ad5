"""Lean training (`bitfit_peft.lean`): the patched causal LM gives the loss and the gradients of the unpatched one,
keeps what it promises to keep (no vocabulary-sized tensor, two of the MLP's three branch tensors), leaves every
other call alone, undoes itself, and refuses by name what it cannot patch.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import transformers
from models import CASES, VOCAB, Case
from peft import get_peft_model

import bitfit_peft
from bitfit_peft.lean import disable_lean_training, enable_lean_training

DECODERS = [c for c in CASES if c.name in ("llama", "mistral", "qwen2")]
CHUNK = 6  # 4 x 7 tokens: four full chunks and a partial one of 4 tokens, one of them labelled


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """One thread: the same reduction order in both runs, so the comparison can be tight."""


def _bitfit(case: Case) -> torch.nn.Module:
    config = bitfit_peft.BitFitConfig(task_type=case.task_type, init_weights=False, **case.bitfit_kwargs)
    return get_peft_model(case.build(frozen=False), config).train()


def _batch(case: Case) -> dict[str, torch.Tensor]:
    batch = case.batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # padded rows take no loss
    return batch


def _step(model: torch.nn.Module, batch: dict[str, Any], scale: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    (loss * scale).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a: tuple[torch.Tensor, dict[str, Any]], b: tuple[torch.Tensor, dict[str, Any]], exact: bool) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    close = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-7)
    assert close(loss_a, loss_b), (loss_a, loss_b)
    for name in grads_a:
        assert close(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("case", DECODERS, ids=lambda c: c.name)
def test_loss_and_gradients_equal_unpatched(case: Case) -> None:
    model, batch = _bitfit(case), _batch(case)
    reference = _step(model, batch)
    patched = enable_lean_training(model, chunk_size=CHUNK)
    assert patched[0] == "base_model.model" and len(patched) == 1 + case.config().num_hidden_layers
    _assert_same(reference, _step(model, batch), exact=False)


@pytest.mark.parametrize("case", DECODERS, ids=lambda c: c.name)
def test_mlp_patch_alone_is_bitwise(case: Case) -> None:
    """The MLP's backward runs autograd's own ops: with the loss left alone, every bit is the same."""
    model, batch = _bitfit(case), _batch(case)
    reference = _step(model, batch)
    enable_lean_training(model, loss=False)
    _assert_same(reference, _step(model, batch), exact=True)


def test_full_fine_tuning_of_a_tied_head() -> None:
    """A trainable head (here tied to the embeddings) gets its gradient from inside the chunked loss."""
    config = transformers.LlamaConfig(**{**DECODERS[0].config().to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = _batch(DECODERS[0])
    reference = _step(model, batch)
    enable_lean_training(model, chunk_size=CHUNK)
    _assert_same(reference, _step(model, batch), exact=False)


def test_num_items_in_batch_and_scaled_loss() -> None:
    """transformers' gradient accumulation divides by `num_items_in_batch` and scales the loss before backward."""
    case = DECODERS[0]
    model, batch = _bitfit(case), {**_batch(case), "num_items_in_batch": torch.tensor(50)}
    reference = _step(model, batch, scale=0.25)
    enable_lean_training(model, chunk_size=CHUNK)
    _assert_same(reference, _step(model, batch, scale=0.25), exact=False)


def test_with_gradient_checkpointing() -> None:
    case = DECODERS[0]
    model, batch = _bitfit(case), _batch(case)
    reference = _step(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_lean_training(model, chunk_size=CHUNK)
    _assert_same(reference, _step(model, batch), exact=False)


def _saved_alive(model: torch.nn.Module, batch: dict[str, Any]) -> list[tuple[int, ...]]:
    """Shapes of the non-parameter tensors saved for backward by one forward and still held when it returns."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    shapes = [tuple(t.shape) for r in refs if (t := r()) is not None]
    del loss
    return shapes


def test_keeps_no_logits_and_two_mlp_branches() -> None:
    case = DECODERS[0]
    model, batch = _bitfit(case), _batch(case)
    config = case.config()
    layers, inter = config.num_hidden_layers, config.intermediate_size
    before = _saved_alive(model, batch)
    assert (
        sum(len(s) > 1 and s[-1] == VOCAB for s in before) >= 1
        and sum(s[-1:] == (inter,) for s in before) == 3 * layers
    )
    enable_lean_training(model, chunk_size=CHUNK)
    after = _saved_alive(model, batch)
    assert sum(len(s) > 1 and s[-1] == VOCAB for s in after) == 0
    assert sum(s[-1:] == (inter,) for s in after) == 2 * layers


def test_other_calls_unchanged_and_disable() -> None:
    case = DECODERS[0]
    model, batch = _bitfit(case), _batch(case)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        eval_logits = model(**batch).logits
    enable_lean_training(model, chunk_size=CHUNK)
    assert model(**batch).logits is None  # the training call: loss only
    loss = model(**batch).loss
    assert torch.equal(model(**batch, return_dict=False)[0], loss)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, eval_logits)  # no gradients: the model's own forward
    assert torch.equal(model(**inputs).logits, eval_logits)  # no labels: the model's own forward
    disable_lean_training(model)
    assert torch.equal(model(**batch).logits, eval_logits)
    assert not any("forward" in vars(m) for m in model.modules())


def test_refuses_by_name() -> None:
    gpt2 = next(c for c in CASES if c.name == "gpt2").build(frozen=False)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM.*found GPT2LMHeadModel\. Pass loss=False"):
        enable_lean_training(gpt2)
    with pytest.raises(TypeError, match=r"no gated MLP.*GPT2LMHeadModel.*mlp=False"):
        enable_lean_training(gpt2, loss=False)
    gelu = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**DECODERS[0].config().to_dict(), "hidden_act": "gelu"})
    )
    with pytest.raises(TypeError, match=r"SiLU only; model.layers.0.mlp uses GELUActivation"):
        enable_lean_training(gelu)
    assert not any("forward" in vars(m) for m in gelu.modules())  # nothing patched when one check fails
    llama = DECODERS[0].build(frozen=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        enable_lean_training(llama, chunk_size=0)
    with pytest.raises(ValueError, match="patches nothing"):
        enable_lean_training(llama, loss=False, mlp=False)
    enable_lean_training(llama.train())
    batch = _batch(DECODERS[0])
    with pytest.raises(ValueError, match="shift_labels"):
        llama(**batch, shift_labels=batch["labels"])
