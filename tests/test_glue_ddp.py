"""`accelerate launch --multi_gpu --num_processes 2` on CPU (DDP over gloo) trains the same adapter as one process."""

from __future__ import annotations

import json
import pathlib
import socket
import sys

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model, run_train
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: pathlib.Path) -> None:
    # No dropout: each process draws its own dropout masks, so only a deterministic model can match exactly.
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = make_tiny_glue(tmp_path / "data", n_train=64, n_dev=32)
    common = ["--model", model, "--data-dir", data, "--task", "sst2", "--method", "bitfit", "--epochs", "2"]
    common += ["--lr", "1e-2", "--no-checkpoints", "--log-every", "1"]

    single = run_train([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    # accelerate 1.15's `launch --cpu --num_processes 2` starts one process unless MPI is set up (its simple
    # launcher); `--multi_gpu` goes through torchrun, and train.py picks DDP over gloo when there is no GPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    ddp = run_train([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], launcher=launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["global_batch_size"] == two["global_batch_size"] == 8
    assert [e["step"] for e in one["dev"]] == [e["step"] for e in two["dev"]] == [8, 16]
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        moved = max(moved, float(a[key].abs().max()))
    assert moved > 1e-3  # the deltas trained, so agreement is not zeros == zeros
    for x, y in zip(one["train_loss"], two["train_loss"], strict=True):
        assert x[0] == y[0] and x[1] == pytest.approx(y[1], rel=1e-4)
