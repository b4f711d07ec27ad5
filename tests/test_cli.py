"""The `bitfit-peft` command line, run as a real subprocess (`python -m bitfit_peft.cli`); the newer checks call
`cli.main` in this process (same code path, no interpreter start per call)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from bitfit_peft import BitFitConfig, cli, compact
from bitfit_peft.card import write_card

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


# ---------------------------------------------------------------- what a training run saved travels along
LABELS = ["negative", "positive"]


@pytest.fixture
def trained(tmp_path: pathlib.Path) -> pathlib.Path:
    """An adapter as examples/glue/train.py leaves it: label names in its config, dev metrics in eval_results.json
    (written by `write_card`), and files with distinct permission bits, so a mode taken from the wrong file shows."""
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"], init_weights=False, labels=LABELS)
    path = tmp_path / "trained"
    get_peft_model(_bert(0), config).save_pretrained(path)
    write_card(str(path), metrics={"dev accuracy": 0.8125}, task="sst2")
    modes = {"adapter_model.safetensors": 0o644, "adapter_config.json": 0o640, "eval_results.json": 0o604}
    for name, mode in {**modes, "README.md": 0o664}.items():
        (path / name).chmod(mode)
    return path


def _inspect_json(path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()  # what earlier commands printed
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_labels_metrics_and_task_round_trip_through_inspect_and_convert(
    trained: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = _inspect_json(trained, capsys)
    saved = {"labels": LABELS, "metrics": {"dev accuracy": 0.8125}, "task": "sst2", "task_type": "SEQ_CLS"}
    assert {k: info[k] for k in saved} == saved
    assert cli.main(["inspect", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "labels       0: negative, 1: positive" in text and "metrics on sst2  dev accuracy 0.8125" in text, text
    out = tmp_path / "int8"
    assert cli.main(["convert", str(trained), str(out), "--to", "int8"]) == 0
    converted = _inspect_json(out, capsys)
    assert {k: converted[k] for k in saved} == saved and converted["dtype"] == "int8"
    assert (out / "eval_results.json").read_bytes() == (trained / "eval_results.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "| Labels | 0: negative, 1: positive |" in card, card
    assert "## Evaluation on sst2 (dev)" in card and "| dev accuracy | 0.8125 |" in card, card
    assert "pipeline_tag: text-classification" in card and "| Task type | SEQ_CLS |" in card, card


def test_convert_keeps_the_original_file_modes(trained: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bf16"
    assert cli.main(["convert", str(trained), str(out), "--to", "bfloat16"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in trained.iterdir()), written
    for name in written:
        assert stat.S_IMODE((out / name).stat().st_mode) == stat.S_IMODE((trained / name).stat().st_mode), name
    # Without a card in the source, the new card takes the config's bits.
    (trained / "README.md").unlink()
    assert cli.main(["convert", str(trained), str(tmp_path / "again"), "--to", "float16"]) == 0
    assert stat.S_IMODE((tmp_path / "again" / "README.md").stat().st_mode) == 0o640


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices)


def test_every_argument_has_help_and_each_default_shows_once() -> None:
    commands = _subcommands()
    assert set(commands) == {"inspect", "convert", "verify", "serve"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help text"
        text = parser.format_help()
        # One entry per argument: "  --flag VALUE   help..." up to the next argument's entry.
        for entry in re.split(r"\n  (?=\S)", text.split("\n\n", 2)[-1]):
            flat = " ".join(entry.split())
            assert "(default: None)" not in flat and flat.count("default") <= 1, f"{name}: {flat}"
    serve = " ".join(commands["serve"].format_help().split())
    assert "(default: 8000)" in serve and "(default: 127.0.0.1)" in serve, serve  # real defaults still show


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_verify_a_missing_base_says_no_such_directory(
    saved: dict[str, pathlib.Path],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    base = str(tmp_path / "no" / "base") if where == "absolute" else "no-base-here"  # the latter is a valid Hub id
    if where == "relative":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline, a name is only ever a directory
    assert cli.main(["verify", str(saved["float32"]), "--base", base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --base {base}: no such directory") and "Repo id" not in err, err


def test_parse_target_reads_the_dtype_and_a_fraction_in_0_1() -> None:
    assert cli.parse_target("int8", "float32") == ("int8", None)
    assert cli.parse_target("int8:1", "float32") == ("int8", 1.0)
    assert cli.parse_target("sparse:0.1", "bfloat16") == ("bfloat16", 0.1)
    assert cli.parse_target("sparse:0.1", "int4") == ("float32", 0.1)  # an unknown current dtype: float32
    for bad in ("int8:0", "sparse:0", "int8:1.5", "float16:-0.1"):
        with pytest.raises(cli.CliError, match=r"the fraction to keep must be in \(0, 1\]"):
            cli.parse_target(bad, "float32")
    with pytest.raises(cli.CliError, match="needs a fraction"):
        cli.parse_target("sparse", "float32")
