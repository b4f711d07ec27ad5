"""The `bitfit-peft` command line, run as a real subprocess (`python -m bitfit_peft.cli`)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from bitfit_peft import BitFitConfig, compact

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bitfit_peft.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _bert(seed: int, hidden: int = 16) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("cli")
    _bert(0).save_pretrained(root / "base")
    _bert(1, hidden=8).save_pretrained(root / "other")
    for dtype in ("float32", "bfloat16"):
        config = BitFitConfig(
            task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False, save_dtype=dtype
        )
        get_peft_model(_bert(0), config).save_pretrained(root / dtype)
    return {p.name: p for p in root.iterdir()}


def _error_line(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr


def test_inspect_text_json_and_plot(saved: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    text = run("inspect", str(saved["float32"]))
    assert text.returncode == 0, text.stderr
    assert "intermediate, query" in text.stdout and "mean |Δb| per term x layer" in text.stdout
    plot = tmp_path / "fig1.png"
    result = run("inspect", str(saved["float32"]), "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["delta_params"] == 2 * (16 + 32) and info["head_params"] == 2 * 16 + 2
    assert info["change_table"]["terms"] == ["query", "intermediate"] and info["change_table"]["layers"] == [0, 1]
    assert info["file_bytes"] == os.path.getsize(saved["float32"] / "adapter_model.safetensors")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_convert_int8_sparse_and_back(saved: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    result = run("convert", str(saved["float32"]), str(tmp_path / "q"), "--to", "int8:0.5")
    assert result.returncode == 0, result.stderr
    assert "max abs error introduced" in result.stdout
    small = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert compact.read_layout(small)["dtype"] == "int8"
    assert "bitfit-peft" in (tmp_path / "q" / "README.md").read_text()
    back = run("convert", str(tmp_path / "q"), str(tmp_path / "f"), "--to", "float32")
    assert back.returncode == 0, back.stderr
    plain = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert not compact.is_packed(plain)
    assert all(torch.equal(plain[k], v) for k, v in compact.decode(small).items())
    assert run("verify", str(tmp_path / "f"), "--base", str(saved["base"])).returncode == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_ok_on_its_base(saved: dict[str, pathlib.Path], dtype: str) -> None:
    result = run("verify", str(saved[dtype]), "--base", str(saved["base"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 missing, 0 unexpected, 0 shape mismatches" in result.stdout


def test_verify_fails_on_another_base_and_on_a_wrong_fingerprint(saved: dict[str, pathlib.Path], tmp_path) -> None:
    result = run("verify", str(saved["float32"]), "--base", str(saved["other"]))
    assert result.returncode == 1 and "shape mismatch" in result.stdout, result.stdout + result.stderr
    adapter = tmp_path / "fp"
    run("convert", str(saved["float32"]), str(adapter), "--to", "float32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_fingerprint": "bf1:sha256:" + "0" * 20}))
    result = run("verify", str(adapter), "--base", str(saved["base"]))
    assert result.returncode == 1 and "fingerprint mismatch" in result.stdout, result.stdout + result.stderr


def test_errors_are_one_line(saved: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    _error_line(run("inspect", str(tmp_path / "missing")), "no such directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((saved["float32"] / "adapter_config.json").read_text())
    data = (saved["float32"] / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _error_line(run("inspect", str(broken)), "corrupt or truncated")
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    _error_line(run("verify", str(broken), "--base", str(saved["base"])), "not a BitFit adapter")
    _error_line(run("convert", str(saved["float32"]), str(tmp_path / "x"), "--to", "int4"), "unknown format")


def test_convert_records_the_new_storage_in_the_config(saved: dict[str, pathlib.Path], tmp_path) -> None:
    assert run("convert", str(saved["bfloat16"]), str(tmp_path / "q"), "--to", "int8:0.5").returncode == 0
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert (config["save_dtype"], config["keep_fraction"], config["packed"]) == ("int8", 0.5, True)
    assert run("convert", str(tmp_path / "q"), str(tmp_path / "f"), "--to", "float32").returncode == 0
    config = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert (config["save_dtype"], config["keep_fraction"], config["packed"]) == ("float32", None, False)


def test_serve_help_through_the_console_script() -> None:
    script = shutil.which("bitfit-peft", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's bitfit_peft, not the installed one
    result = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--adapters" in result.stdout and "--max-batch-size" in result.stdout
    listed = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert all(c in listed.stdout for c in ("inspect", "convert", "verify", "serve")), listed.stdout


def test_console_script_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bitfit-peft"] == "bitfit_peft.cli:main"
