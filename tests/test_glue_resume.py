"""Resuming examples/glue/train.py from an Accelerate checkpoint ends with exactly the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from glue_bitfit import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resume")
    # Dropout on: resumption must restore the RNG state too, not only weights and optimizer.
    return {"model": make_tiny_model(root / "model", dropout=0.1), "data": make_tiny_glue(root / "data")}


def _argv(tiny: dict[str, str], out: pathlib.Path, method: str) -> list[str]:
    return [
        "--model", tiny["model"], "--data-dir", tiny["data"], "--task", "sst2", "--method", method,
        "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--grad-accum", "2", "--save-steps", "2",
        "--lr", "5e-3", "--warmup-ratio", "0.2", "--log-every", "1",
    ]  # fmt: skip


def _checkpoint_numbers(out: pathlib.Path) -> list[int]:
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert all(re.fullmatch(r"checkpoint_\d+", n) for n in names), names
    return sorted(int(n.split("_")[1]) for n in names)


@pytest.mark.parametrize(
    "method,stop_after",
    [("bitfit", 5), ("bitfit", 4), ("full", 3)],
    ids=["bitfit-mid-epoch", "bitfit-epoch-end", "full-mid-epoch"],
)
def test_resume_equals_uninterrupted(
    tiny: dict[str, str], tmp_path: pathlib.Path, method: str, stop_after: int
) -> None:
    # 64 examples / (batch 8 x accum 2) = 4 optimizer steps per epoch, 8 in all.
    assert train.main(_argv(tiny, tmp_path / "straight", method)) == 0
    interrupted = tmp_path / "resumed"
    assert train.main([*_argv(tiny, interrupted, method), "--stop-after-steps", str(stop_after)]) == 0
    assert not (interrupted / "results.json").exists()
    # Accelerate's ProjectConfiguration names them checkpoint_<save count> and keeps --save-total-limit (2).
    before = _checkpoint_numbers(interrupted)
    assert len(before) == 2
    latest = interrupted / "checkpoints" / f"checkpoint_{before[-1]}"
    assert json.loads((latest / train.STATE_FILE).read_text())["completed_steps"] == stop_after
    assert train.main([*_argv(tiny, interrupted, method), "--resume-from-checkpoint", "latest"]) == 0
    after = _checkpoint_numbers(interrupted)  # numbering continues after the resumed-from checkpoint
    assert len(after) == 2 and after[0] > before[-1]

    weights = "adapter_model.safetensors" if method == "bitfit" else "trainable.safetensors"
    for sub in ("final", "."):  # last and best
        a, b = load_file(tmp_path / "straight" / sub / weights), load_file(interrupted / sub / weights)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((interrupted / "results.json").read_text())
    assert ra["dev"] == rb["dev"] and ra["train_loss"] == rb["train_loss"] and ra["best"] == rb["best"]
    # the deltas did move (so equality is not trivially zeros == zeros)
    final = load_file(interrupted / "final" / weights)
    assert any(k.endswith("bitfit_delta") or "classifier" not in k for k in final)
    assert max(float(t.abs().max()) for k, t in final.items() if "classifier" not in k) > 0


def test_resume_from_a_dir_that_is_not_a_checkpoint(tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert train.main([*_argv(tiny, tmp_path / "out", "bitfit"), "--resume-from-checkpoint", str(tmp_path)]) == 2
    assert "is not a checkpoint of this script" in capsys.readouterr().err
    assert train.main([*_argv(tiny, tmp_path / "out", "bitfit"), "--resume-from-checkpoint", "latest"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
