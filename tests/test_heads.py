"""bitfit_peft.heads (mean-pooling classification head) and bitfit_peft.analysis (per-layer, per-term ||Δb||)."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from glue_helpers import make_tiny_model
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel

import bitfit_peft  # noqa: F401
from bitfit_peft import BitFitConfig
from bitfit_peft.analysis import (
    bias_changes,
    bias_changes_from_state_dicts,
    bias_deltas,
    change_matrix,
    normalised_change,
)
from bitfit_peft.heads import MeanPooledSequenceClassifier, MeanPoolingHead, uses_mean_pooling

CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _classifier(num_labels: int = 2, problem_type: str | None = None) -> MeanPooledSequenceClassifier:
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(**CONFIG, hidden_dropout_prob=0.0), add_pooling_layer=False)
    return MeanPooledSequenceClassifier(encoder, num_labels=num_labels, problem_type=problem_type).eval()


def test_pool_ignores_padding() -> None:
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = MeanPoolingHead.pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


def test_logits_do_not_depend_on_padding() -> None:
    model = _classifier()
    ids = torch.tensor([[2, 7, 9, 3]])
    padded = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 5, 6, 8, 11, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        batched = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(batched[0:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_labels,problem_type", [(1, None), (3, None), (3, "multi_label_classification")])
def test_loss_follows_problem_type(num_labels: int, problem_type: str | None) -> None:
    model = _classifier(num_labels, problem_type)
    ids = torch.tensor([[2, 7, 9, 3], [2, 5, 6, 3]])
    if num_labels == 1:
        labels = torch.tensor([0.5, 2.0])
    elif problem_type is None:
        labels = torch.tensor([0, 2])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = model(input_ids=ids, labels=labels)
    if num_labels == 1:
        expected = torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels)
    elif problem_type is None:
        expected = torch.nn.functional.cross_entropy(out.logits, labels)
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


def test_module_names_match_the_standard_sequence_classifier() -> None:
    ours = {n for n, _ in _classifier().named_modules() if ".layer." in n}
    standard = {n for n, _ in BertForSequenceClassification(BertConfig(**CONFIG)).named_modules() if ".layer." in n}
    assert ours == standard


def test_bitfit_trains_biases_and_the_whole_head(tmp_path: pathlib.Path) -> None:
    model = get_peft_model(_classifier(), BitFitConfig(task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n and n.endswith("out_proj.weight") for n in trainable)  # head trained whole
    assert all("bitfit_delta" in n or "classifier" in n for n in trainable)
    ids = torch.tensor([[2, 7, 9, 3]])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=ids, labels=torch.tensor([1])).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_classifier(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_from_pretrained_and_mean_pooling_detection(tmp_path: pathlib.Path) -> None:
    plain = make_tiny_model(tmp_path / "plain")
    st = make_tiny_model(tmp_path / "st", sentence_transformers=True)
    assert uses_mean_pooling(st) and not uses_mean_pooling(plain) and not uses_mean_pooling("org/hub-id")
    model = MeanPooledSequenceClassifier.from_pretrained(st, num_labels=3)
    assert model.num_labels == 3 and model.config.num_labels == 3
    assert not any("pooler" in n for n, _ in model.named_parameters())


def test_head_errors() -> None:
    with pytest.raises(ValueError, match=r"num_labels must be at least 1, got 0"):
        MeanPoolingHead(8, 0)
    with pytest.raises(ValueError, match=r"Invalid problem_type 'ranking'"):
        _classifier(2, "ranking")


# ---------------------------------------------------------------- analysis


def _bitfit_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(BertForSequenceClassification(BertConfig(**CONFIG)), BitFitConfig(task_type="SEQ_CLS"))


def test_bias_changes_place_each_delta_in_its_term_and_layer() -> None:
    model = _bitfit_bert()
    terms, layers, matrix = change_matrix(bias_changes(model))
    assert terms == ("query", "key", "value", "attention_output", "intermediate", "output", "layernorm")
    assert layers == [0, 1] and float(abs(matrix).max()) == 0.0  # untrained: nothing moved
    layer = model.base_model.model.bert.encoder.layer[1]
    with torch.no_grad():
        layer.attention.self.query.bitfit_delta["default"].fill_(-2.0)
        layer.intermediate.dense.bitfit_delta["default"][:8] = 1.0  # 8 of 32 entries
    terms, layers, matrix = change_matrix(bias_changes(model))
    assert matrix[terms.index("query"), 1] == pytest.approx(2.0)
    assert matrix[terms.index("intermediate"), 1] == pytest.approx(8 / 32)
    assert matrix.sum() == pytest.approx(2.0 + 8 / 32)
    rms = {c.module_name: c.value for c in bias_changes(model, norm="rms")}
    assert rms["bert.encoder.layer.1.intermediate.dense"] == pytest.approx(math.sqrt(8 / 32))
    assert "bert.encoder.layer.1.attention.self.query" in bias_deltas(model)


def test_bias_changes_from_state_dicts() -> None:
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {k: v.clone() for k, v in before.items()}
    after["bert.encoder.layer.0.output.dense.bias"] += 0.5
    changes = bias_changes_from_state_dicts(before, after, "bert")
    terms, layers, matrix = change_matrix(changes)
    assert matrix[terms.index("output"), 0] == pytest.approx(0.5)
    assert matrix[terms.index("attention_output"), 0] == 0.0  # `output` never matches attention.output.dense
    with pytest.raises(ValueError, match=r"share no '\*\.bias' entry"):
        bias_changes_from_state_dicts({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, "bert")


def test_analysis_errors() -> None:
    with pytest.raises(ValueError, match=r"No BitFit layer with adapter 'default'"):
        bias_deltas(BertForSequenceClassification(BertConfig(**CONFIG)))
    with pytest.raises(ValueError, match=r"No BitFit layer with adapter 'other'"):
        bias_deltas(_bitfit_bert(), "other")
    with pytest.raises(ValueError, match=r"Unknown norm 'l3'"):
        normalised_change(torch.zeros(3), "l3")


def _bert_config() -> BertConfig:
    return BertConfig(**CONFIG)


def _mean_pooled_adapter(path: pathlib.Path) -> pathlib.Path:
    model = get_peft_model(_classifier(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.save_pretrained(str(path))
    return path


def _unchanged(model: torch.nn.Module) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    params = [(n, str(p.sum().item()), p.requires_grad) for n, p in model.named_parameters()]
    return params, [(n, type(m).__name__) for n, m in model.named_modules()]


def test_the_head_is_recorded_and_a_mean_pooled_adapter_is_refused_on_another_head(tmp_path: pathlib.Path) -> None:
    import json

    path = _mean_pooled_adapter(tmp_path / "mean")
    assert json.loads((path / "adapter_config.json").read_text())["head"] == "mean_pooling"
    torch.manual_seed(1)
    standard = BertForSequenceClassification(_bert_config())
    before = _unchanged(standard)
    with pytest.raises(ValueError, match=r"head 'mean_pooling'.*'BertForSequenceClassification'.*MeanPooledSequenceClassifier"):  # fmt: skip
        PeftModel.from_pretrained(standard, str(path))
    assert _unchanged(standard) == before and not hasattr(standard, "peft_config")
    # onto the class it names, it loads
    loaded = PeftModel.from_pretrained(_classifier(), str(path))
    assert loaded.peft_config["default"].head == "mean_pooling"
    # and the other way round: a standard classifier's adapter is refused on a mean-pooled model, by name
    peft_std = get_peft_model(BertForSequenceClassification(_bert_config()), BitFitConfig(task_type="SEQ_CLS"))
    peft_std.save_pretrained(str(tmp_path / "std"))
    with pytest.raises(ValueError, match=r"load it onto BertForSequenceClassification"):
        PeftModel.from_pretrained(_classifier(), str(tmp_path / "std"))
    # load_adapter onto a peft model of another head: refused too, and the model keeps only its own adapter
    with pytest.raises(ValueError, match="MeanPooledSequenceClassifier"):
        peft_std.load_adapter(str(path), adapter_name="mean")
    assert list(peft_std.peft_config) == ["default"]


def test_old_configs_without_a_head_still_load(tmp_path: pathlib.Path) -> None:
    import json

    path = _mean_pooled_adapter(tmp_path / "mean")
    config = json.loads((path / "adapter_config.json").read_text())
    del config["head"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(_classifier(), str(path))
    assert loaded.peft_config["default"].head is None
