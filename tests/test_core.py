"""Core behaviours on a tiny BERT: registration, peft idioms, merge, mixed batches, hotswap, task arithmetic, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitLayer, hotswap_adapter

ROOT = Path(__file__).parents[1]
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)


def bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)).eval()


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (n, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(), **kw).logits


def snapshot(model: torch.nn.Module) -> dict[str, object]:
    """Everything a failed call must leave untouched: structure, values, requires_grad."""
    return {
        "modules": [(k, type(m).__name__) for k, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "attrs": sorted(k for k in vars(model) if "peft" in k),
    }


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["modules"] == after["modules"]
    assert before["grad"] == after["grad"]
    assert before["attrs"] == after["attrs"]
    b, a = before["state"], after["state"]
    assert isinstance(b, dict) and isinstance(a, dict) and b.keys() == a.keys()
    for k in b:
        assert torch.equal(b[k], a[k]), k


def trained(tmp_path: Path, name: str = "a", **config: object) -> tuple[PeftModel, Path]:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, **config))
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


# ---------------------------------------------------------------------------------------------- registration
def test_registration_fills_peft_mappings_without_touching_peft_type() -> None:
    from peft.utils import PeftType

    assert "BITFIT" not in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BITFIT"] is BitFitConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["BITFIT"] is bitfit_peft.BitFitModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["BITFIT"] == "bitfit_"
    bitfit_peft.register()  # idempotent
    import importlib

    importlib.reload(bitfit_peft)  # re-import registers again without error


def test_registration_refuses_a_name_or_prefix_held_by_another_method() -> None:
    key = bitfit_peft.BitFitPeftType.BITFIT
    saved = PEFT_TYPE_TO_CONFIG_MAPPING[key]
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = PeftConfig
    try:
        with pytest.raises(ValueError, match="already has a config registered for peft_type 'BITFIT'"):
            bitfit_peft.register()
    finally:
        PEFT_TYPE_TO_CONFIG_MAPPING[key] = saved
    PEFT_TYPE_TO_PREFIX_MAPPING["OTHER"] = "bitfit_"  # type: ignore[index]
    try:
        with pytest.raises(ValueError, match="prefix 'bitfit_' is already used by peft_type 'OTHER'"):
            bitfit_peft.register()
    finally:
        del PEFT_TYPE_TO_PREFIX_MAPPING["OTHER"]  # type: ignore[arg-type]


def test_fresh_process_loads_with_every_peft_entry_point(tmp_path: Path) -> None:
    """PeftModel.from_pretrained, PeftConfig.from_pretrained, AutoPeftModel and transformers' load_adapter."""
    model, adapter = trained(tmp_path)
    base_dir = tmp_path / "base"
    bert().save_pretrained(base_dir)
    expected = logits(model.eval())
    torch.save(expected, tmp_path / "expected.pt")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    script = textwrap.dedent(
        f"""
        import torch, transformers, bitfit_peft
        from peft import PeftConfig, PeftModel, AutoPeftModelForSequenceClassification
        tmp = {str(tmp_path)!r}
        expected = torch.load(tmp + "/expected.pt")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 99, (4, 9), generator=g); mask = torch.ones_like(ids); mask[0, 6:] = 0
        def out(m):
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=mask).logits
        assert type(PeftConfig.from_pretrained(tmp + "/a")).__name__ == "BitFitConfig"
        base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp + "/base").eval()
        assert torch.allclose(out(PeftModel.from_pretrained(base, tmp + "/a").eval()), expected, atol=1e-6)
        auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp + "/a").eval()
        assert torch.allclose(out(auto), expected, atol=1e-6)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp + "/base").eval()
        hf.load_adapter(tmp + "/a", adapter_name="a")
        assert torch.allclose(out(hf), expected, atol=1e-6), "transformers load_adapter"
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- semantics
def test_fresh_adapter_is_bitwise_base_and_only_deltas_and_head_train() -> None:
    ref = logits(bert())
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS"))
    assert torch.equal(logits(model.eval()), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".bitfit_delta." in n or ".modules_to_save.default." in n for n in trainable)
    n_bias = sum(p.numel() for n, p in bert().named_parameters() if n.endswith("bias") and "classifier" not in n)
    n_delta = sum(p.numel() for n, p in model.named_parameters() if ".bitfit_delta." in n)
    assert n_delta == n_bias


def test_training_writes_only_deltas_and_head() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS"))
    base_before = {
        k: v.clone()
        for k, v in model.get_base_model().state_dict().items()
        if "modules_to_save" not in k and "bitfit_" not in k
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    opt.step()
    after = model.get_base_model().state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), k
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".bitfit_delta." in n)


def test_merge_unmerge_and_merge_and_unload() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    unmerged = logits(model)
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base_layer.bias")}
    model.merge_adapter()
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    model.unmerge_adapter()
    for k, v in biases.items():
        assert torch.equal(model.state_dict()[k], v), k
    plain = model.merge_and_unload()
    assert not any(isinstance(m, BitFitLayer) for m in plain.modules())
    assert torch.allclose(logits(plain), unmerged, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_safe_merge_refuses_non_finite_and_changes_nothing(bad: float) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS")).eval()
    layer = next(m for m in model.modules() if isinstance(m, BitFitLayer))
    with torch.no_grad():
        layer.bitfit_delta["default"][0] = bad
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="non-finite biases"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_add_missing_bias_merge_creates_and_unmerge_removes_the_bias() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=99,
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="have no bias .* set add_missing_bias=True"):
        get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM"))
    model = get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, init_weights=False))
    ids = batch()["input_ids"]
    out = model(input_ids=ids).logits
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.bias is None
    model.merge_adapter()
    assert q_proj.base_layer.bias is not None
    assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-5)
    model.unmerge_adapter()
    assert q_proj.base_layer.bias is None
    plain = model.merge_and_unload()
    assert plain.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.allclose(plain(input_ids=ids).logits, out, atol=1e-5)


def test_disable_adapter_gives_exact_base_outputs() -> None:
    ref = logits(bert())
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    assert not torch.equal(logits(model), ref)
    with model.disable_adapter():
        # the head is a modules_to_save copy; with adapters disabled the original head runs
        assert torch.equal(logits(model), ref)


# ---------------------------------------------------------------------------------------------- many adapters
def test_mixed_batch_rows_equal_each_adapter_alone(tmp_path: Path) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("q", BitFitConfig(task_type="SEQ_CLS", init_weights=False, bias_terms=["query"]))
    model.eval()
    per = {}
    for name in ("default", "q"):
        model.set_adapter(name)
        per[name] = logits(model)
    with model.disable_adapter():
        per["__base__"] = logits(model)
    names = ["q", "__base__", "default", "q"]
    mixed = logits(model, adapter_names=names)
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], per[name][i], atol=1e-6), name
    # a hotswap of one adapter is seen by the next mixed call (table rows are refreshed, not stale)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitFitLayer) and "q" in m.bitfit_delta:
                m.bitfit_delta["q"].add_(0.5)
    model.set_adapter("q")
    again = logits(model, adapter_names=names)
    assert torch.allclose(again[0], logits(model)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"adapter_names": ["default", "nope", "default", "default"]}, ValueError, r"Unknown adapter name\(s\).*nope"),
        ({"adapter_names": ["default"] * 3}, ValueError, "3 entries but a layer received a batch of 4"),
        ({"adapter_names": "default"}, TypeError, "one adapter name per example"),
    ],
)
def test_mixed_batch_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS")).eval()
    with pytest.raises(error, match=match):
        logits(model, **kwargs)


def test_mixed_batch_with_too_few_or_too_many_names_says_how_many_examples_there_are() -> None:
    # checked up front, before any layer runs: a layer would refuse it too, but with a message about rows (8 here:
    # 4 prompts x 2 beams) that does not say the batch has 4 examples
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=99))
    model = get_peft_model(gpt2.eval(), BitFitConfig(task_type="CAUSAL_LM", init_weights=False))
    model.add_adapter("other", BitFitConfig(task_type="CAUSAL_LM", init_weights=False))
    model.eval()
    ids = batch()["input_ids"]
    for names in (["default", "other"], ["default"] * 5):
        with pytest.raises(ValueError, match=f"has {len(names)} entries but the batch has 4 examples"):
            model.generate(input_ids=ids, adapter_names=names, num_beams=2, max_new_tokens=2, do_sample=False)


def test_mixed_batch_refuses_training_mode_and_merged_adapters() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="for inference: call model.eval"):
        model(**batch(), adapter_names=["default"] * 4)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base model: call model.unmerge_adapter"):
        logits(model, adapter_names=["default"] * 4)


def test_base_is_a_reserved_adapter_name() -> None:
    with pytest.raises(ValueError, match='"__base__" is reserved'):
        get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS"), adapter_name="__base__")


def test_hotswap_keeps_parameter_objects_and_matches_a_fresh_load(tmp_path: Path) -> None:
    other, path = trained(tmp_path, "b")
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS")).eval()
    params = {n: p for n, p in model.named_parameters()}
    hotswap_adapter(model, str(path), adapter_name="default")
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.allclose(logits(model), logits(other.eval()), atol=1e-6)


def test_hotswap_rejects_another_config_and_changes_nothing(tmp_path: Path) -> None:
    _, path = trained(tmp_path, "q", bias_terms=["query"])
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS")).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="targets other modules"):
        hotswap_adapter(model, str(path))
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="No adapter 'x' to hotswap"):
        hotswap_adapter(model, str(path), adapter_name="x")
    # the other way round: a checkpoint over more modules than the adapter has (only unexpected keys)
    _, everything = trained(tmp_path, "all")
    query_only = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"])).eval()
    before = snapshot(query_only)
    with pytest.raises(ValueError, match=r"targets other modules \(missing \[\], unexpected \["):
        hotswap_adapter(query_only, str(everything))
    assert_same(before, snapshot(query_only))


def test_add_weighted_adapter_is_the_linear_combination() -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("q", BitFitConfig(task_type="SEQ_CLS", init_weights=False, bias_terms=["query"]))
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix")
    model.add_weighted_adapter(["default", "q"], [1.0, 1.0], "union")
    for m in model.modules():
        if isinstance(m, BitFitLayer):
            d = m.bitfit_delta
            assert torch.allclose(d["mix"], 0.5 * d["default"] - 2.0 * d["b"])
            expected = d["default"] + d.get("q", 0)
            assert torch.allclose(d["union"], expected)
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "bad")
    with pytest.raises(ValueError, match="Unknown adapters \\['nope'\\]"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "bad")
    # an existing name (not one of the combined adapters) is refused, and that adapter keeps its deltas
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".mix")}
    with pytest.raises(ValueError, match="Adapter 'mix' already exists"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix")
    after = model.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- bad input
def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"Unknown bias_terms \['querry'\]. Must be any of"):
        BitFitConfig(bias_terms=["querry"])
    with pytest.raises(ValueError, match="Set either bias_terms or target_modules, not both"):
        BitFitConfig(bias_terms=["query"], target_modules=["query"])
    with pytest.raises(ValueError, match="Invalid save_dtype 'int4'"):
        BitFitConfig(save_dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="packed=False cannot store save_dtype='int8'"):
        BitFitConfig(save_dtype="int8", packed=False)


def test_selecting_nothing_lists_candidates() -> None:
    with pytest.raises(ValueError, match=r"selected no module of BertForSequenceClassification.*Modules with a bias"):
        get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", target_modules=["nonexistent"]))


def test_unknown_architecture_with_bias_terms_says_use_target_modules() -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with pytest.raises(ValueError, match="has no BitFit mapping .* Pass target_modules"):
        get_peft_model(Tiny(), BitFitConfig(bias_terms=["query"]))
    model = get_peft_model(Tiny(), BitFitConfig(target_modules=["lin"]))
    assert model.get_nb_trainable_parameters()[0] == 3


def _base_after_failed_load(path: Path, base: torch.nn.Module, match: str) -> None:
    before = snapshot(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, str(path))
    assert_same(before, snapshot(base))


def test_checkpoint_from_another_base_is_refused_and_model_untouched(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    torch.manual_seed(0)
    wider = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**BERT, "intermediate_size": 41})
    ).eval()
    _base_after_failed_load(path, wider, r"intermediate\.dense\.bitfit_delta has shape \(37,\) in the checkpoint")


def test_missing_and_unexpected_keys_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, path = trained(tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    dropped = {k: v for k, v in weights.items() if "layer.1.attention.self.query" not in k}
    save_file(dropped, path / "adapter_model.safetensors")
    _base_after_failed_load(path, bert(), r"missing deltas for modules .*layer\.1\.attention\.self\.query")
    extra = dict(weights)
    extra["base_model.model.bert.pooler.extra.bitfit_delta"] = torch.zeros(3)
    save_file(extra, path / "adapter_model.safetensors")
    _base_after_failed_load(path, bert(), "unexpected keys")


def test_corrupt_or_truncated_file_is_refused_before_touching_the_model(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _base_after_failed_load(path, bert(), "is not a valid safetensors checkpoint .* truncated or corrupt")
    file.write_bytes(b"not a safetensors file at all")
    _base_after_failed_load(path, bert(), "is not a valid safetensors checkpoint")


def test_second_adapter_failing_to_load_leaves_the_first_intact(tmp_path: Path) -> None:
    model, _ = trained(tmp_path)
    _, bad = trained(tmp_path, "bad", bias_terms=["query"])
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["bias_terms"] = ["key"]  # config and weights disagree
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    model.eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not fit this model"):
        model.load_adapter(str(bad), adapter_name="bad")
    assert "bad" not in model.peft_config
    assert_same(before, snapshot(model))


def test_unknown_peft_type_and_unknown_adapter_name(tmp_path: Path) -> None:
    model, path = trained(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "BITFIT2"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="BITFIT2"):
        PeftConfig.from_pretrained(str(path))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")


def test_save_dtype_halves_the_file_and_loads_back_to_float32(tmp_path: Path) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="bfloat16"))
    model.save_pretrained(tmp_path / "bf16")
    plain = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="bfloat16"))
    plain.peft_config["default"].packed = False  # one bfloat16 tensor per bias
    plain.save_pretrained(tmp_path / "bf16-plain")
    model.peft_config["default"].save_dtype = None
    model.peft_config["default"].packed = None
    model.save_pretrained(tmp_path / "fp32")
    from safetensors import safe_open

    def stored(name: str) -> dict[str, torch.dtype]:
        with safe_open(tmp_path / name / "adapter_model.safetensors", "pt") as f:
            return {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118

    assert stored("bf16")["bitfit_packed"] == torch.bfloat16
    assert {d for k, d in stored("bf16-plain").items() if "bitfit_delta" in k} == {torch.bfloat16}
    assert {d for k, d in stored("fp32").items() if "bitfit_delta" in k} == {torch.float32}
    sizes = {n: os.path.getsize(tmp_path / n / "adapter_model.safetensors") for n in ("bf16", "bf16-plain", "fp32")}
    assert sizes["bf16"] < sizes["bf16-plain"] < sizes["fp32"]
    for name in ("bf16", "bf16-plain"):
        loaded = PeftModel.from_pretrained(bert(), str(tmp_path / name))
        for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
            if "bitfit_delta" in n:
                assert q.dtype == torch.float32 and torch.equal(q, p.detach().to(torch.bfloat16).float()), name


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_mixed_adapters_matches_each_adapter_alone(arch: str, beams: int) -> None:
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, bos_token_id=1, eos_token_id=2)
        base, task = transformers.GPT2LMHeadModel(cfg), "CAUSAL_LM"
    else:
        cfg = transformers.BartConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            vocab_size=99,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            pad_token_id=0,
        )
        base, task = transformers.BartForConditionalGeneration(cfg), "SEQ_2_SEQ_LM"
    model = get_peft_model(base.eval(), BitFitConfig(task_type=task, init_weights=False))
    model.add_adapter("other", BitFitConfig(task_type=task, init_weights=False))
    with torch.no_grad():  # large deltas, so that each adapter visibly changes the greedy generations
        for name, p in model.named_parameters():
            if "bitfit_delta" in name:
                p.mul_(20)
    model.eval()
    ids = torch.randint(3, 99, (3, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0, eos_token_id=None)
    per = {}
    with torch.no_grad():
        for name in ("default", "other"):
            model.set_adapter(name)
            per[name] = model.generate(input_ids=ids, **kw)
        with model.disable_adapter():
            per["__base__"] = model.generate(input_ids=ids, **kw)
        names = ["other", "__base__", "default"]
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
    assert len({tuple(per[n].flatten().tolist()) for n in per}) == 3, "adapters should change the generations"
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], per[name][i]), (name, mixed[i], per[name][i])


def test_torch_compile_hotswap_needs_no_recompile_and_mixed_batches_stay_correct(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    other, path = trained(tmp_path, "b")
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert torch.allclose(compiled(**batch()).logits, logits(model), atol=1e-6)
        graphs = counters["stats"]["unique_graphs"]
        hotswap_adapter(model, str(path))
        swapped = compiled(**batch()).logits
    assert counters["stats"]["unique_graphs"] == graphs, "hotswap must not trigger a recompilation"
    assert torch.allclose(swapped, logits(other.eval()), atol=1e-6)
    # mixed batches through the compiled model stay correct (the BitFit layers fetch their routing eagerly)
    names = ["default", "__base__", "default", "__base__"]
    with torch.no_grad():
        mixed = compiled(**batch(), adapter_names=names).logits
    assert torch.allclose(mixed, logits(model, adapter_names=names), atol=1e-6)


def test_mixed_table_shares_storage_with_the_deltas_and_training_still_works(tmp_path: Path) -> None:
    """Resident adapters cost their payload once: after a mixed call, each full-width delta lives in its table row."""
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.eval()
    names = ["b", "default", "__base__", "b"]
    before = logits(model, adapter_names=names)
    layer = next(m for m in model.modules() if isinstance(m, BitFitLayer))
    table = model.base_model.router.routing.tables[layer].table  # type: ignore[union-attr]
    for name in ("default", "b"):
        assert layer.bitfit_delta[name].untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    # training after serving writes the deltas (and so the table rows), and the next mixed call sees it
    model.train()
    model.set_adapter("b")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    model.eval()
    after = logits(model, adapter_names=names)
    assert torch.equal(after[1], before[1]) and not torch.allclose(after[0], before[0])
    assert torch.allclose(after[0], logits(model)[0], atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(bert(), str(tmp_path / "b")).eval()
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-6)


def test_mixed_batch_under_inference_mode_leaves_adapters_usable() -> None:
    """Regression: tables built under torch.inference_mode() made the deltas inference tensors, so set_adapter
    (requires_grad=True) and training failed afterwards."""
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.eval()
    names = ["b", "default", "__base__", "b"]
    with torch.inference_mode():
        first = model(**batch(), adapter_names=names).logits
        model.set_adapter("b")
        single = model(**batch()).logits
    assert torch.allclose(first[0], single[0], atol=1e-6)
    model.set_adapter("default")
    model.train()
    model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".bitfit_delta.default" in n)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch(), adapter_names=names).logits, first, atol=1e-6)


def test_set_adapter_touches_only_the_adapters_that_change() -> None:
    # a model without a task head: peft allows only one active head copy at a time
    model = get_peft_model(transformers.BertModel(transformers.BertConfig(**BERT)), BitFitConfig())
    for i in range(3):
        model.add_adapter(f"t{i}", BitFitConfig())

    def trainable() -> set[str]:
        return {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and "bitfit" in n}

    assert trainable() == {"default"}
    model.set_adapter("t1")
    assert trainable() == {"t1"}
    model.base_model.set_adapter(["t0", "t2"])
    assert trainable() == {"t0", "t2"}
    with model.disable_adapter():
        assert trainable() == set()
    assert trainable() == {"t0", "t2"}


def test_several_active_adapters_add_their_deltas_unmerged_and_merged() -> None:
    # peft's multi-adapter activation (base_model.set_adapter([...])): every active delta counts, not just the first
    model = get_peft_model(transformers.BertModel(transformers.BertConfig(**BERT)).eval(), BitFitConfig())
    for name in ("p", "q", "r"):
        model.add_adapter(name, BitFitConfig(init_weights=False))
    model.base_model.add_weighted_adapter(["p", "q", "r"], [1.0, 1.0, 1.0], "sum")
    model.eval()

    def hidden() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch()).last_hidden_state

    model.set_adapter("sum")
    expected = hidden()
    model.set_adapter("p")
    only_p = hidden()
    model.base_model.set_adapter(["p", "q", "r"])
    assert not torch.allclose(only_p, expected, atol=1e-3)
    assert torch.allclose(hidden(), expected, atol=1e-5)
    model.merge_adapter()
    assert torch.allclose(hidden(), expected, atol=1e-5)
    model.unmerge_adapter()


# --------------------------------------------------------------------- regressions a one-line bug could pass by
def _base_biases(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        k: None if m.get_base_layer().bias is None else m.get_base_layer().bias.detach().clone()
        for k, m in model.named_modules()
        if isinstance(m, BitFitLayer)
    }


@pytest.mark.parametrize("add_missing_bias", [False, True])
def test_merging_two_adapters_in_two_calls_then_unmerging_restores_the_base_biases_bit_for_bit(
    add_missing_bias: bool,
) -> None:
    """A second merge must not take the pre-merge snapshot again: that would restore base + A, not the base."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37
    )
    base = transformers.LlamaForCausalLM(config) if add_missing_bias else bert()
    cfg = dict(init_weights=False, add_missing_bias=add_missing_bias)
    model = get_peft_model(base.eval(), BitFitConfig(**cfg))  # type: ignore[arg-type]
    model.add_adapter("b", BitFitConfig(**cfg))  # type: ignore[arg-type]
    before = _base_biases(model)
    model.merge_adapter(["default"])
    merged_a = _base_biases(model)
    model.merge_adapter(["b"])
    assert any(v is not None and not torch.equal(v, merged_a[k]) for k, v in _base_biases(model).items())
    model.unmerge_adapter()
    after = _base_biases(model)
    assert after.keys() == before.keys()
    for key, bias in before.items():
        if bias is None:
            assert after[key] is None, f"{key}: a bias that merge created must go away again"
        else:
            assert torch.equal(after[key], bias), key  # type: ignore[arg-type]
    assert any(v is None for v in before.values()) == add_missing_bias


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_per_key_bfloat16_file_without_autocast_gives_deltas_in_the_base_dtype(
    tmp_path: Path, base_dtype: torch.dtype, low_cpu_mem_usage: bool
) -> None:
    """peft's promise for autocast_adapter_dtype=False: the adapter keeps the base model's dtype, whatever dtype the
    file stores. A packed file decodes to float32 anyway, so only a one-tensor-a-key file can tell."""
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="bfloat16"))
    model.peft_config["default"].packed = False
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if "bitfit_delta" in k} == {torch.bfloat16}  # noqa: SIM118
    saved = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters() if "bitfit_delta" in n}
    loaded = PeftModel.from_pretrained(
        bert().to(base_dtype), str(tmp_path), autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu_mem_usage
    )
    got = {n: p.detach() for n, p in loaded.named_parameters() if "bitfit_delta" in n}
    assert got.keys() == saved.keys()
    for name, delta in got.items():
        assert delta.dtype == base_dtype, name
        assert torch.equal(delta, saved[name].to(base_dtype)), name


def test_hotswap_whose_last_delta_has_the_wrong_shape_raises_and_changes_nothing() -> None:
    """Every shape is checked before the first write: a check inside the write loop would have written all the
    deltas before the last one."""
    model = get_peft_model(transformers.BertModel(transformers.BertConfig(**BERT)).eval(), BitFitConfig())
    from peft import get_peft_model_state_dict

    state = {k: torch.full_like(v, 0.25) for k, v in get_peft_model_state_dict(model).items()}
    keys = list(state)
    assert all("bitfit_delta" in k for k in keys)  # no head: the last key is the last delta written
    state[keys[-1]] = torch.zeros(state[keys[-1]].shape[0] + 1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot hotswap .*bitfit_delta: shape \(\d+,\) in the checkpoint"):
        hotswap_adapter(model, state)
    assert_same(before, snapshot(model))
    # and the same file without the bad entry swaps every value
    state[keys[-1]] = torch.full_like(
        before["state"][f"{keys[-1].removesuffix('bitfit_delta')}bitfit_delta.default"], 0.25
    )  # type: ignore[index]
    hotswap_adapter(model, state)
    assert all(bool((p == 0.25).all()) for n, p in model.named_parameters() if "bitfit_delta" in n)


def test_gpt2_fused_query_rows_follow_an_optimizer_step() -> None:
    """bias_terms=["query"] on GPT-2 covers a slice of the fused c_attn bias, so the table rows are copies, not
    views: after an optimizer step on the delta, the next mixed call must equal the adapter alone."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=32)
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config), BitFitConfig(bias_terms=["query"], init_weights=False)
    )
    model.add_adapter("b", BitFitConfig(bias_terms=["query"], init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, BitFitLayer))
    assert "b" in layer.bitfit_index  # the fused slice
    ids = torch.randint(1, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    names = ["b", "default", "__base__", "b"]

    def run(**kw: object) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits

    model.eval()
    first = run(adapter_names=names)
    model.train()
    model.set_adapter("b")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    for p in trainable:  # query-bias gradients of a random tiny model are ~1e-6: take a step that shows
        p.grad = torch.ones_like(p)
    opt.step()
    model.eval()
    mixed = run(adapter_names=names)
    alone = run()
    assert not torch.allclose(mixed[0], first[0], atol=1e-4)  # the step changed adapter b
    assert torch.allclose(mixed[0], alone[0], atol=1e-5) and torch.allclose(mixed[3], alone[3], atol=1e-5)
    assert torch.equal(mixed[1], first[1])
