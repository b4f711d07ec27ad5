"""`transformers.Trainer` trains a BitFit model: a few steps, save, reload, same outputs; the base stays frozen."""

from __future__ import annotations

import pathlib

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import bitfit_peft  # noqa: F401
from bitfit_peft import BitFitConfig
from bitfit_peft.heads import MeanPooledSequenceClassifier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trainer")
    return {"model": make_tiny_model(root / "model", dropout=0.1), "data": make_tiny_glue(root / "data")}


def _dataset(tiny: dict[str, str]) -> tuple[object, object]:
    from glue_bitfit import data as glue_data

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ds = glue_data.load_task(glue_data.get_task("sst2"), tiny["data"])
    return glue_data.tokenize(ds["train"], tok, 32), tok


def _build(tiny: dict[str, str], head: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if head == "mean":
        return MeanPooledSequenceClassifier.from_pretrained(tiny["model"], num_labels=2)
    return AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_trainer_trains_saves_and_reloads_bitfit(tiny: dict[str, str], tmp_path: pathlib.Path, head: str) -> None:
    train_ds, tok = _dataset(tiny)
    base = _build(tiny, head)
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters() if not n.startswith("classifier")}
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    assert result.global_step == 6 and result.training_loss > 0

    deltas = {n: p for n, p in model.named_parameters() if "bitfit_delta" in n}
    assert deltas and all(p.requires_grad for p in deltas.values())
    assert any(float(p.detach().abs().max()) > 0 for p in deltas.values())
    for n, p in model.get_base_model().named_parameters():  # every base weight and bias is untouched
        key = n.replace(".base_layer", "")
        if key in frozen_before:
            assert torch.equal(p, frozen_before[key]), n

    model.save_pretrained(tmp_path / "adapter")
    batch = DataCollatorWithPadding(tok)(
        [{k: train_ds[i][k] for k in ("input_ids", "attention_mask")} for i in range(8)]
    )
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    reloaded = PeftModel.from_pretrained(_build(tiny, head), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-6)
