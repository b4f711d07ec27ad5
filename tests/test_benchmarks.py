"""The benchmark suite's quick mode runs end to end and writes a complete report (never checks a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = ("training", "memory", "inference", "mixed", "files", "scaling")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"quick benchmark run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_results_json_has_every_case(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    assert results["mode"] == "quick"
    assert set(results["cases"]) == set(CASES)
    for name, case in results["cases"].items():
        assert "error" not in case, f"case {name} failed: {case.get('error')}"
        assert case["tables"], f"case {name} produced no table"
        assert "wall_s" in case
    for key in ("cores_usable", "torch", "torch_threads"):
        assert key in results["machine"]


@pytest.mark.slow
def test_bitfit_rows_are_measured(quick_run: Path) -> None:
    """Every case ran its BitFit variants (none skipped because the library failed to import)."""
    cases = json.loads((quick_run / "results.json").read_text())["cases"]
    assert not any(case.get("skipped") for case in cases.values()), {k: c.get("skipped") for k, c in cases.items()}
    training = cases["training"]["groups"][0]["timing"]
    assert {"floor", "bitfit", "full", "lora", "beft", "beft-all"} <= set(training["times"])
    assert all(t["met"] in (True, False) for case in cases.values() for t in case["targets"])


@pytest.mark.slow
def test_report_names_every_case(quick_run: Path) -> None:
    report = (quick_run / "report.md").read_text()
    assert report.startswith("# bitfit-peft benchmark report (quick mode)")
    for name in CASES:
        assert f"(`{name}`)" in report
    assert "## Targets" in report
