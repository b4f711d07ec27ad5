"""examples/glue/train.py: options, results.json schema, every method, metrics, data layout and bad inputs.

Malformed data files have their own table in test_glue_data.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model, run_train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from glue_bitfit import data as glue_data  # noqa: E402
from glue_bitfit import modeling, train  # noqa: E402
from glue_bitfit.metrics import compute_metrics  # noqa: E402

RESULT_KEYS = {
    "task", "method", "bias_terms", "pooling", "seed", "train_size", "trainable_params", "total_params", "dev",
    "best", "adapter_bytes", "adapter_file", "wall_time_s", "train_loss", "lr", "epochs", "num_processes",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("glue")
    return {
        "model": make_tiny_model(root / "model", dropout=0.0),
        "st_model": make_tiny_model(root / "st_model", dropout=0.0, sentence_transformers=True),
        "data": make_tiny_glue(root / "data"),
    }


def _train(tiny: dict[str, str], out: pathlib.Path, *extra: str) -> int:
    args = ["--model", tiny["model"], "--data-dir", tiny["data"], "--output-dir", str(out), "--batch-size", "8"]
    return train.main([*args, "--task", "sst2", "--epochs", "2", "--no-checkpoints", *extra])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("bitfit", []),
        ("bitfit", ["--bias-terms", "query", "intermediate"]),
        ("full", ["--lr", "1e-3"]),
        ("head", []),
        ("lora", []),
        ("beft", []),
    ],
)
def test_every_method_writes_results_and_weights(tiny: dict[str, str], tmp_path: pathlib.Path, method: str, extra: list[str]) -> None:  # fmt: skip
    out = tmp_path / "run"
    assert _train(tiny, out, "--method", method, *extra) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= RESULT_KEYS
    assert results["method"] == method and results["task"] == "sst2" and results["train_size"] == 64
    assert [e["epoch"] for e in results["dev"]] == [1, 2]
    assert results["best"]["accuracy"] == max(e["accuracy"] for e in results["dev"])
    assert results["adapter_bytes"] == (out / results["adapter_file"]).stat().st_size > 0
    assert (out / "final" / results["adapter_file"]).is_file()
    assert 0 < results["trainable_params"] <= results["total_params"]
    if method == "bitfit":
        assert (out / "adapter_config.json").is_file()
        assert results["bias_terms"] == (extra[1:] or None)
    if method == "head":  # only the classifier: hidden*2 + 2
        assert results["trainable_params"] == 32 * 2 + 2


def test_epochs_and_lr_default_per_method(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    """Without --epochs / --lr a run uses the method's measured defaults (modeling.DEFAULT_EPOCHS / DEFAULT_LR)."""
    args = ["--model", tiny["model"], "--data-dir", tiny["data"], "--output-dir", str(tmp_path), "--batch-size", "16"]
    assert train.main([*args, "--task", "sst2", "--method", "head", "--train-size", "16", "--no-checkpoints"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == modeling.DEFAULT_EPOCHS["head"] == len(results["dev"])
    assert results["lr"] == modeling.DEFAULT_LR["head"]
    assert set(modeling.DEFAULT_EPOCHS) == set(modeling.DEFAULT_LR) == set(modeling.METHODS)


def test_bf16_mixed_precision_and_grad_accum(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    # A fresh process: Accelerate's state is a per-process singleton fixed by the first Accelerator's precision.
    args = ["--model", tiny["model"], "--data-dir", tiny["data"], "--task", "sst2", "--output-dir", str(tmp_path)]
    proc = run_train([*args, "--mixed-precision", "bf16", "--grad-accum", "2", "--batch-size", "8", "--epochs", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mixed_precision"] == "bf16" and results["global_batch_size"] == 16
    assert results["dev"][0]["step"] == 4  # 64 examples / (8 x 2)
    assert "trainable parameters" in proc.stdout and "adapter on disk" in proc.stdout


def render(output: str) -> list[str]:
    """The lines a terminal shows for `output` (stdout and stderr as one stream): a carriage return goes back to the
    line's start and overwrites it, `ESC[A` moves up a line (tqdm's nested bars), trailing blanks dropped."""
    screen: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[A|\r|\n|[^\r\n\x1b]+|\x1b", output):
        if token == "\n":
            row, col = row + 1, 0
            screen += [[] for _ in range(row + 1 - len(screen))]
        elif token == "\r":
            col = 0
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        else:
            line = screen[row]
            line += [" "] * (col + len(token) - len(line))
            line[col : col + len(token)] = token
            col += len(token)
    return ["".join(line).rstrip() for line in screen]


def test_output_reads_as_lines_without_a_load_table(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    """What the main job shows on a terminal: one line on what the checkpoint lacked (not transformers' LOAD REPORT
    table), each epoch's result on a line of its own (not glued to the progress bar), a bar while the dev set runs."""
    args = ["--model", tiny["st_model"], "--data-dir", tiny["data"], "--task", "sst2", "--output-dir", str(tmp_path)]
    env = {"PYTHONUNBUFFERED": "1"}  # stdout and stderr interleave as a terminal would show them
    proc = run_train([*args, "--epochs", "2", "--train-size", "16", "--batch-size", "8", "--no-checkpoints"], env=env, stderr_to_stdout=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "LOAD REPORT" not in proc.stdout and "sst2 dev" in proc.stdout, proc.stdout[-3000:]
    lines = render(proc.stdout)
    new = (
        "newly initialised: classifier.out_proj.weight, classifier.out_proj.bias (this task's head, which this run "
        "trains); not loaded: pooler.dense.bias, pooler.dense.weight (mean pooling does not use the pooler)"
    )
    assert new in lines, lines
    for epoch in (1, 2):
        assert any(re.fullmatch(rf"epoch {epoch}: accuracy=\d\.\d{{4}}", line) for line in lines), lines
    assert any(re.fullmatch(r"dev accuracy: \d\.\d{4} \(best epoch \d\) \| .* s", line) for line in lines), lines


def test_load_line_warns_of_what_does_not_fit() -> None:
    info = {
        "missing_keys": {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"},
        "unexpected_keys": {"cls.predictions.bias"},
        "mismatched_keys": [("bert.embeddings.word_embeddings.weight", (30, 32), (50, 32))],
    }
    line = modeling.describe_load(info, ["classifier.weight", "classifier.bias"], "cls")
    head, warning = line.split("\n")
    assert head == "newly initialised: classifier.weight, classifier.bias (this task's head, which this run trains)"
    assert warning == (
        "warning: the checkpoint does not fit the model: bert.pooler.dense.weight missing from the checkpoint "
        "(random); cls.predictions.bias in the checkpoint but unused; bert.embeddings.word_embeddings.weight resized "
        "from (30, 32) to (50, 32)"
    )


def test_bias_terms_subset_trains_fewer_parameters(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    _train(tiny, tmp_path / "all", "--epochs", "1")
    _train(tiny, tmp_path / "qm2", "--epochs", "1", "--bias-terms", "query", "intermediate")
    all_terms = json.loads((tmp_path / "all" / "results.json").read_text())["trainable_params"]
    qm2 = json.loads((tmp_path / "qm2" / "results.json").read_text())["trainable_params"]
    # 2 layers x (query 32 + intermediate 64) biases + classifier (32*2+2) + pooler stays frozen
    assert qm2 == 2 * (32 + 64) + 66 < all_terms
    # the best adapter's model card shows its dev metric and the task's label names travel in its config
    results = json.loads((tmp_path / "qm2" / "results.json").read_text())
    card = (tmp_path / "qm2" / "README.md").read_text()
    assert f"{results['best']['accuracy']:.4f}"[:5] in card and "sst2" in card, card
    config = json.loads((tmp_path / "qm2" / "adapter_config.json").read_text())
    assert config["labels"] == ["0", "1"] and config["problem_type"] == "single_label_classification"


def test_learns_tiny_task_and_train_size_subset(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "run"
    assert (
        _train(
            tiny, out, "--method", "full", "--epochs", "6", "--lr", "2e-3", "--train-size", "48", "--pooling", "mean"
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["train_size"] == 48 and results["pooling"] == "mean"
    assert results["best"]["accuracy"] >= 0.75
    losses = [loss for _, loss in results["train_loss"]]
    assert losses[-1] < losses[0]


def test_regression_task_stsb_reports_correlations(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "run"
    args = ["--model", tiny["st_model"], "--data-dir", tiny["data"], "--output-dir", str(out), "--task", "stsb"]
    assert train.main([*args, "--epochs", "1", "--batch-size", "8", "--no-checkpoints"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pooling"] == "mean"  # auto: the checkpoint has a sentence-transformers mean-pooling config
    assert results["main_metric"] == "pearson" and {"pearson", "spearman"} <= set(results["best"])


def test_sentence_pairs_are_tokenized_as_pairs(tiny: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    ds = glue_data.load_task(glue_data.get_task("stsb"), tiny["data"])
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    enc = glue_data.tokenize(ds["train"].select(range(2)), tok, 64)
    ids, types = enc[0]["input_ids"], enc[0]["token_type_ids"]
    assert ids.count(tok.sep_token_id) == 2 and 0 in types and 1 in types


def test_label_text_task_split_is_fixed(tmp_path: pathlib.Path) -> None:
    lines = [f"{i % 2} example number {i}" for i in range(100)]
    (tmp_path / "subj.all").write_text("\n".join(lines))
    first = glue_data.load_task(glue_data.get_task("subj"), str(tmp_path))
    second = glue_data.load_task(glue_data.get_task("subj"), str(tmp_path))
    assert len(first["dev"]) == 10 and first["dev"]["text_a"] == second["dev"]["text_a"]


@pytest.mark.parametrize(
    "names,pred,gold,expected",
    [
        (("accuracy",), [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
        (("f1",), [1, 0, 1, 1], [1, 0, 0, 1], {"f1": 0.8}),
        (("mcc",), [1, 0, 1, 0], [1, 0, 1, 0], {"mcc": 1.0}),
        (("pearson", "spearman"), [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], {"pearson": 1.0, "spearman": 1.0}),
        (("pearson",), [0.5, 0.5, 0.5], [1.0, 2.0, 3.0], {"pearson": 0.0}),
    ],
)
def test_metrics(names: tuple[str, ...], pred: list[float], gold: list[float], expected: dict[str, float]) -> None:
    got = compute_metrics(names, np.array(pred), np.array(gold))
    assert got == pytest.approx(expected)


def test_every_glue_task_is_defined_with_metrics() -> None:
    expected = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1", "mnli": "accuracy"}
    for name in glue_data.GLUE_TASKS:
        task = glue_data.get_task(name)
        assert task.hub is not None and task.main_metric == expected.get(name, "accuracy")
    assert glue_data.get_task("SST-2").name == "sst2" and glue_data.get_task("stsb").is_regression


# ---------------------------------------------------------------- bad input: one message, nothing written


def _bad(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], **over: str) -> str:
    opts = {
        "--model": tiny["model"],
        "--data-dir": tiny["data"],
        "--task": "sst2",
        "--output-dir": str(tmp_path / "out"),
    }
    opts.update(over)
    argv = [x for kv in opts.items() for x in kv] + ["--epochs", "1", "--no-checkpoints"]
    assert train.main(argv) == 2
    assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    return err


def test_unknown_task(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "Unknown task 'sst3'. Choose one of: cola, sst2" in _bad(tiny, tmp_path, capsys, **{"--task": "sst3"})


def test_data_dir_without_task_files(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    err = _bad(tiny, tmp_path, capsys, **{"--task": "rte"})
    assert "needs RTE/train.tsv and RTE/dev.tsv under --data-dir" in err and "laid out like GLUE" in err


def test_missing_data_dir(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not a directory" in _bad(tiny, tmp_path, capsys, **{"--data-dir": str(tmp_path / "nope")})


def test_save_total_limit_must_keep_one(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert "--save-total-limit must be at least 1, got 0" in _bad(
        tiny, tmp_path, capsys, **{"--save-total-limit": "0"}
    )


def test_model_path_does_not_exist(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    err = _bad(tiny, tmp_path, capsys, **{"--model": str(tmp_path / "no-model")})
    assert "is not a directory" in err and "--model" in err


def test_model_dir_without_a_model(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _bad(tiny, tmp_path, capsys, **{"--model": str(tmp_path / "empty")})


def test_bias_terms_with_other_method(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = ["--method", "full", "--bias-terms", "query"]
    opts = {
        "--model": tiny["model"],
        "--data-dir": tiny["data"],
        "--task": "sst2",
        "--output-dir": str(tmp_path / "out"),
    }
    assert train.main([x for kv in opts.items() for x in kv] + argv) == 2
    assert "--bias-terms applies to --method bitfit only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_results(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "run"
    assert _train(tiny, out, "--epochs", "1") == 0
    assert _train(tiny, out, "--epochs", "1") == 2
    assert "already holds results.json" in capsys.readouterr().err


def test_load_task_errors_name_the_fix(tiny: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"Unknown task 'foo'\. Choose one of"):
        glue_data.get_task("foo")
    with pytest.raises(ValueError, match=r"--train-size must be positive, got 0"):
        glue_data.subsample(glue_data.load_task(glue_data.get_task("sst2"), tiny["data"])["train"], 0, 0)
