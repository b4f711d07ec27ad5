"""examples/glue/reproduce.py and report.py: grid layout, learning-rate pick, Markdown table and PNG figures."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from glue_bitfit import report, reproduce, train  # noqa: E402


def test_grid_report_renders_table_and_figures(tmp_path: pathlib.Path) -> None:
    model = make_tiny_model(tmp_path / "model", dropout=0.0, sentence_transformers=True)
    data = make_tiny_glue(tmp_path / "data")
    out = tmp_path / "grid"
    cells = [("bitfit", 1e-3, 64), ("bitfit", 3e-2, 64), ("head", 1e-2, 64), ("head", 1e-2, 32), ("full", 1e-3, 64)]
    for variant, lr, n in cells:
        method, terms, pooling = reproduce.VARIANTS[variant]
        run = reproduce.Run("sst2", variant, lr, n, 0, 2)
        assert run.path(str(out)).endswith(os.path.join("sst2", variant, f"lr{lr:g}", "e2", f"n{n}", "s0"))
        argv = ["--model", model, "--data-dir", data, "--task", "sst2", "--method", method, "--pooling", pooling]
        argv += ["--lr", str(lr), "--epochs", "2", "--train-size", str(n), "--batch-size", "8", "--no-checkpoints"]
        assert train.main([*argv, "--output-dir", run.path(str(out))]) == 0

    runs = report.load_runs(str(out))
    assert {r["_variant"] for r in runs} == {"bitfit", "head", "full"}
    assert report.main_size(runs, "sst2") == 64
    best_bitfit = max((r for r in runs if r["_variant"] == "bitfit"), key=lambda r: r["_score"])
    picked = report.pick(runs, "sst2", "bitfit", 64)
    assert picked is not None and picked[0] == (best_bitfit["lr"], 2)

    docs = tmp_path / "docs"
    report.render(str(out), str(docs))
    text = (out / "results_table.md").read_text()
    assert "| BitFit (all biases) |" in text and "| Head only | 66 (sst2) |" in text
    assert "||Δb||₁ / dim per term and layer" in text and "| sst2 | query |" in text
    for name in ("small_data.png", "loss_curves.png", "bias_change.png"):
        png = docs / "figures" / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_grid_arguments_are_checked() -> None:
    assert reproduce.parse_per_variant(["bitfit=1e-3,1e-2", "full=5e-5"]) == {"bitfit": [1e-3, 1e-2], "full": [5e-5]}
    with pytest.raises(ValueError, match=r"Bad --lrs entry 'bitfit:1e-3': write VARIANT=LR"):
        reproduce.parse_per_variant(["bitfit:1e-3"])
    with pytest.raises(ValueError, match=r"Bad --lrs entry 'adam=1'"):
        reproduce.parse_per_variant(["adam=1"])
    assert reproduce.parse_per_variant(["bitfit=3,10"], "--epoch-grid", int) == {"bitfit": [3, 10]}
    with pytest.raises(ValueError, match=r"Bad --epoch-grid entry 'bitfit=2.5': write VARIANT=EPOCHS"):
        reproduce.parse_per_variant(["bitfit=2.5"], "--epoch-grid", int)
    assert reproduce.main(["run", "--model", "m", "--variants", "bitfit", "--lrs", "full=1e-4", "--curve-sizes"]) == 2
    with pytest.raises(ValueError, match=r"No finished run under"):
        report.load_runs("/nonexistent")


def test_driver_sweeps_lr_and_epochs_then_reruns_the_pick(tmp_path: pathlib.Path) -> None:
    """`run` end to end, 2 jobs at a time: the other seed and the curve use the (lr, epochs) picked on seed 0."""
    model = make_tiny_model(tmp_path / "model", dropout=0.0, sentence_transformers=True)
    make_tiny_glue(tmp_path / "data" / "glue")
    out = tmp_path / "grid"
    argv = ["run", "--model", model, "--data-root", str(tmp_path / "data"), "--out", str(out), "--tasks", "sst2"]
    argv += ["--variants", "bitfit", "--lrs", "bitfit=1e-4,3e-2", "--epoch-grid", "bitfit=1,2"]
    argv += ["--seeds", "0", "1", "--train-size", "48", "--dev-size", "0", "--batch-size", "8", "--jobs", "2"]
    argv += ["--curve-variants", "bitfit", "--curve-sizes", "24"]
    assert reproduce.main(argv) == 0

    runs = report.load_runs(str(out))
    sweep = [r for r in runs if r["_variant"] == "bitfit" and r["seed"] == 0 and r["train_size"] == 48]
    assert sorted((r["lr"], r["epochs"]) for r in sweep) == [(1e-4, 1), (1e-4, 2), (3e-2, 1), (3e-2, 2)]
    best = max(sweep, key=lambda r: r["_score"])
    assert len(sweep[0]["dev"]) == sweep[0]["epochs"]
    for seed, size in ((1, 48), (0, 24)):
        (rerun,) = [r for r in runs if r["_variant"] == "bitfit" and r["seed"] == seed and r["train_size"] == size]
        assert (rerun["lr"], rerun["epochs"]) == (best["lr"], best["epochs"])
    assert len(runs) == 6
    picked = report.pick(runs, "sst2", "bitfit", 48)
    assert picked is not None and picked[0] == (best["lr"], best["epochs"]) and len(picked[1]) == 2
    assert "(lr " in report.table(runs) and " ep, 2 seeds)" in report.table(runs)
