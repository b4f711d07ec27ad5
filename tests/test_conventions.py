"""peft's conventions kept exactly, and regression tests for behaviours a one-line bug could break unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from bitfit_peft import BitFitConfig, BitFitLayer

pytestmark = pytest.mark.usefixtures("single_thread")

BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)


def bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)).eval().to(dtype)


def gpt2(dtype: torch.dtype = torch.float32) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval().to(dtype)


def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
    )
    return transformers.LlamaForCausalLM(config).eval()


def ids(n: int = 4) -> torch.Tensor:
    return torch.randint(1, 99, (n, 7), generator=torch.Generator().manual_seed(1))


def out(model: torch.nn.Module, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), **kw).logits.float()


def base_biases(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        k: None if m.get_base_layer().bias is None else m.get_base_layer().bias.detach().clone()
        for k, m in model.named_modules()
        if isinstance(m, BitFitLayer)
    }


# ---------------------------------------------------------------------------------------------- peft conventions
def test_safe_merge_of_a_broken_adapter_raises_peft_s_sentence() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS"))
    layer = next(m for m in model.modules() if isinstance(m, BitFitLayer))
    with torch.no_grad():
        layer.bitfit_delta["default"][0] = float("nan")
    before = base_biases(model)
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        model.merge_adapter(safe_merge=True)
    after = base_biases(model)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k] is not None)


@pytest.mark.parametrize(
    ("build", "module", "features"),
    [
        (bert, "bert.encoder.layer.0.intermediate.dense", (32, 37)),
        (bert, "bert.encoder.layer.0.attention.output.LayerNorm", (32, 32)),
        (gpt2, "transformer.h.0.attn.c_attn", (32, 96)),
    ],
)
def test_layers_expose_in_and_out_features_like_peft_layers(build: object, module: str, features: tuple) -> None:
    model = get_peft_model(build(), BitFitConfig())  # type: ignore[operator]
    layer = model.base_model.model.get_submodule(module)
    assert isinstance(layer, BitFitLayer)
    assert (layer.in_features, layer.out_features) == features


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_deltas_in_the_base_dtype(dtype: torch.dtype) -> None:
    kept = get_peft_model(bert(dtype=dtype), BitFitConfig(task_type="SEQ_CLS"), autocast_adapter_dtype=False)
    default = get_peft_model(bert(dtype=dtype), BitFitConfig(task_type="SEQ_CLS"))
    assert {p.dtype for n, p in kept.named_parameters() if "bitfit_delta" in n} == {dtype}
    assert {p.dtype for n, p in default.named_parameters() if "bitfit_delta" in n} == {torch.float32}


def test_random_init_clearly_changes_outputs_and_two_adapters_differ_from_one() -> None:
    """peft's test mixins merge two random adapters and expect another output than one at atol=rtol=1e-3."""
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("other", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    with model.disable_adapter():
        base = out(model)
    one = out(model)
    assert not torch.allclose(one, base, atol=1e-3, rtol=1e-3)
    model.merge_adapter(["default", "other"])
    two = out(model)
    assert not torch.allclose(two, one, atol=1e-3, rtol=1e-3)


# -------------------------------------------------------------------------------- regressions a test must catch
@pytest.mark.parametrize("build", [bert, llama])
def test_two_separate_merges_then_unmerge_restore_every_base_bias_exactly(build: object) -> None:
    cfg = dict(init_weights=False, add_missing_bias=True)
    model = get_peft_model(build(), BitFitConfig(**cfg))  # type: ignore[operator,arg-type]
    model.add_adapter("b", BitFitConfig(**cfg))  # type: ignore[arg-type]
    before = base_biases(model)
    model.merge_adapter(["default"])
    model.merge_adapter(["b"])  # a second merge must not re-snapshot the already merged bias
    model.unmerge_adapter()
    after = base_biases(model)
    assert before.keys() == after.keys()
    for key, bias in before.items():
        if bias is None:
            assert after[key] is None, f"{key}: add_missing_bias layers must get no bias back"
        else:
            assert torch.equal(after[key], bias), key  # type: ignore[arg-type]
    if build is llama:
        assert any(v is None for v in before.values())


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_bf16_checkpoint_loads_into_fp32_deltas_without_autocast(tmp_path: Path, low_cpu_mem_usage: bool) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="bfloat16"))
    model.save_pretrained(str(tmp_path))
    saved = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters() if "bitfit_delta" in n}
    loaded = PeftModel.from_pretrained(
        bert(), str(tmp_path), autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu_mem_usage
    )
    deltas = {n: p for n, p in loaded.named_parameters() if "bitfit_delta" in n}
    assert deltas.keys() == saved.keys()
    for name, param in deltas.items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param.detach(), saved[name]), name


@pytest.mark.parametrize("case", ["gpt2-fused-query", "bf16-base", "fp16-base"])
def test_mixed_rows_see_in_place_updates(case: str) -> None:
    """Rows that are copies (a fused QKV slice) or tables of another dtype than the base must be refreshed after an
    in-place update of the deltas; full-width fp32 rows share storage and never exercise that path."""
    if case == "gpt2-fused-query":
        model = get_peft_model(gpt2(), BitFitConfig(bias_terms=["query"], init_weights=False))
        model.add_adapter("b", BitFitConfig(bias_terms=["query"], init_weights=False))
        tol = 1e-5
    else:
        dtype = torch.bfloat16 if case == "bf16-base" else torch.float16
        model = get_peft_model(bert(dtype=dtype), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
        model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
        tol = 2e-2
    model.eval()
    names = ["b", "default", "__base__", "b"]
    first = out(model, adapter_names=names)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bitfit_delta.b"):
                param.add_(1.0)
    second = out(model, adapter_names=names)
    assert not torch.allclose(second[0], first[0], atol=tol)
    assert torch.allclose(second[1], first[1], atol=tol)
    model.set_adapter("b")
    assert torch.allclose(second[0], out(model)[0], atol=tol)


def test_deleted_adapter_is_refused_in_mixed_batches_and_the_rest_still_match() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    for name in ("b", "c"):
        model.add_adapter(name, BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.eval()
    out(model, adapter_names=["b", "c", "default", "__base__"])  # builds the routing with "b" in it
    model.delete_adapter("b")
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) in adapter_names: \['b'\]"):
        out(model, adapter_names=["b", "c", "default", "__base__"])
    mixed = out(model, adapter_names=["c", "default", "c", "__base__"])
    for i, name in enumerate(["c", "default", "c"]):
        model.set_adapter(name)
        assert torch.allclose(mixed[i], out(model)[i], atol=1e-5), name
    with model.disable_adapter():
        assert torch.allclose(mixed[3], out(model)[3], atol=1e-5)
