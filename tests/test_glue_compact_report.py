"""examples/glue/compact_report.py (table and figure) and compact_sizes.py (sizes of a model shape)."""

from __future__ import annotations

import json
import pathlib

import compact_report  # examples/glue is on the path through pyproject's [tool.pytest.ini_options] pythonpath
import compact_sizes
import pytest
import torch

torch.set_num_threads(1)


def _eval(tmp: pathlib.Path, seed: int, acc: float) -> str:
    data = {
        "task": "sst2",
        "main_metric": "accuracy",
        "results": [
            {"form": "original", "file_bytes": 50_992, "metrics": {"accuracy": acc}},
            {"form": "int8:0.4", "file_bytes": 7_569 + seed, "metrics": {"accuracy": acc - 0.01}},
        ],
    }
    path = tmp / f"sst2-s{seed}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_table_is_mean_and_sample_std_over_seeds(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    evals = [_eval(tmp_path, s, a) for s, a in enumerate((0.80, 0.81, 0.82))]
    retrained = tmp_path / "results.json"
    retrained.write_text(json.dumps({
        "task": "sst2", "main_metric": "accuracy", "keep_fraction": 0.4, "retrain_epochs": 1, "lr": 0.01,
        "retrain_lr": 0.003, "best": {"accuracy": 0.8}, "adapter_bytes": 7_600,
    }))  # fmt: skip
    figure = tmp_path / "fig.png"
    compact_report.main(["--evals", *evals, "--retrained", str(retrained), "--figure", str(figure)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| fp32 (peft file) | 81.00 ± 1.00 (+0.00) | 50,992 |"
    assert lines[3] == "| sparse 40% (int8) | 80.00 ± 1.00 (-1.00) | 7,569–7,571 |"
    assert lines[4] == "| sparse 40% (int8) + re-trained 1 ep lr 0.003 | 80.00 ± 0.00 (-1.00, n=1) | 7,600 |"
    assert figure.stat().st_size > 10_000


def test_sizes_of_a_minilm_shaped_adapter() -> None:
    out = compact_sizes.sizes("minilm", ["query", "intermediate"], 2, ["float32", "int8", "int8:0.5", "int8:0.1"])
    assert out["deltas"] == 6 * (384 + 1536) and out["head"] == 2 * 384 + 2
    sizes = [out["forms"][f]["file_bytes"] for f in ("peft float32", "float32", "int8", "int8:0.5", "int8:0.1")]
    assert sizes == sorted(sizes, reverse=True)
    # int8 stores one byte a value: the file is the values plus a small, fixed overhead.
    assert 0 < out["forms"]["int8"]["file_bytes"] - (out["deltas"] + out["head"]) < 1_000
