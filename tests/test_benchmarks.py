"""The benchmark suite's quick mode and the GPU check's CPU dry run run end to end and write complete reports.

No test checks a timing; the ratios are only checked to exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = ("training", "memory", "inference", "mixed", "files", "scaling", "store", "serving", "generate")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = _run_module(["benchmarks.run", "--quick", "--out", str(out)])
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


@pytest.mark.slow
def test_serving_case_measures_every_variant_over_http(quick_run: Path) -> None:
    """The serving case's quick mode: every (k, variant) run answered its requests, batches mixed tasks, the p99
    check and the memory of the server processes were measured."""
    case = json.loads((quick_run / "results.json").read_text())["cases"]["serving"]
    ks = case["config"]["ks"]
    assert set(case["runs"]) == {f"{v} k={k}" for k in ks for v in ("a", "b", "c")}
    for name, runs in case["runs"].items():
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs), (name, runs)
        assert all(r["batch_size"] >= 1 for r in runs), (name, runs)
    assert all(r["batch_tasks"] > 1 for r in case["runs"][f"a k={max(ks)}"])  # a batch held several tasks
    assert all(p["p99_s"] > 0 for paced in case["paced"].values() for p in paced)
    assert set(case["memory"]) == {"ab", "c", "d"} and all(m["private"] > 0 for m in case["memory"].values())
    assert len(case["targets"]) == 2 + len(ks) and len(case["tables"]) == 3


@pytest.mark.slow
def test_generate_case_streams_from_every_variant(quick_run: Path) -> None:
    """The generation case's quick mode: every server answered every streamed request with tokens, the head-of-line
    pairs and the one-stream runs were measured, and our server's greedy stream equals `PeftModel.generate` offline."""
    case = json.loads((quick_run / "results.json").read_text())["cases"]["generate"]
    cfg = case["config"]
    variants = {"ours", "static", "transformers"}
    expected = {f"ours C={c} k={k}" for c in cfg["concurrency"] for k in cfg["ks"]}
    expected |= {f"static C={c} k={max(cfg['ks'])}" for c in cfg["concurrency"]}
    assert set(case["throughput"]) == expected | {f"transformers C={c}" for c in cfg["concurrency"]}
    for name, runs in case["throughput"].items():
        streams = int(name.split("C=")[1].split()[0])
        for r in runs:
            assert r["errors"] == 0, (name, r["first_error"])
            assert r["requests"] == streams * cfg["per_stream"] and r["tokens"] > 0 and r["ttft_p50_s"] > 0, (name, r)
    assert set(case["hol"]) == variants
    for name, runs in case["hol"].items():
        assert all(not x[p].get("error") for x in runs for p in ("alone", "short", "long")), (name, runs)
        assert all(x["long"]["tokens"] > x["short"]["tokens"] > 0 for x in runs), (name, runs)
    assert set(case["single"]) == variants | {"offline"}
    assert case["single_same_text"] is True  # greedy over HTTP == PeftModel.generate with the same adapter
    assert len(case["targets"]) == 3 * len(cfg["concurrency"]) + 2 and len(case["tables"]) == 3


def _run_module(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    """The GPU check's CPU path runs its correctness checks and every timed comparison on the tiny model."""
    proc = _run_module(
        ["benchmarks.gpu_check", "--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)]
    )
    assert proc.returncode == 0, f"gpu_check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu"
    correctness = report["correctness"]
    assert correctness["mixed_max_abs_err"] <= 1e-4 and correctness["merge_max_abs_err"] <= 1e-3
    assert all(correctness[d]["fresh_equals_base"] for d in ("torch.bfloat16", "torch.float16"))
    assert [(r["batch"], r["seq"]) for r in report["bert_base"]] == [(2, 16), (4, 16)]
    for shape in report["bert_base"]:
        assert set(shape["train"]["times"]) == {"floor", "bitfit", "full"}
        assert set(shape["infer"]["times"]) == {"base", "bitfit", "bitfit-merged", "mixed 32 adapters"}
        assert all(ratio["n"] == 1 for ratio in shape["ratios"].values())


def test_models_option_keeps_only_those_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import case_training
    from benchmarks.common import Settings

    case = case_training.run(Settings.for_mode(True, models=("gpt2-shaped",), repeats=2))
    assert [g["model"] for g in case["groups"]] == ["gpt2-shaped"]
    assert case["groups"][0]["timing"]["repeats"] == 2
    assert len(case["targets"]) == 2 and len(case["tables"]) == 1


def test_settings_reject_unknown_models_and_zero_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.common import Settings

    with pytest.raises(ValueError, match=r"Unknown model\(s\) \['bert'\]; choose from"):
        Settings.for_mode(True, models=("bert",))
    with pytest.raises(ValueError, match="repeats must be >= 1; got 0"):
        Settings.for_mode(True, repeats=0)


def test_every_planted_bug_still_applies_to_the_code() -> None:
    """`benchmarks.planted_bugs` finds each bug's text exactly once in today's code, so the audit plants every bug
    (it refuses one that does not apply): code changes that move a planted line must move the bug with it."""
    from benchmarks.planted_bugs import BUGS

    root = Path(__file__).resolve().parents[1]
    stale = {bug.name: (root / bug.file).read_text().count(bug.old) for bug in BUGS}
    assert {name: n for name, n in stale.items() if n != 1} == {}
    assert len({bug.name for bug in BUGS}) == len(BUGS) >= 50
