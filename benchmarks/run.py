"""Command line of the suite: runs the selected cases and writes `results.json` and `report.md`.

python -m benchmarks.run [--quick] [--out DIR] [--cases training memory ...] [--models minilm ...] [--repeats N]
    [--threads N] [--merge]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from . import (
    case_files,
    case_generate,
    case_inference,
    case_memory,
    case_mixed,
    case_scaling,
    case_serving,
    case_store,
    case_training,
)
from .common import MODELS, Settings, machine_info
from .report import render


def _store_case(settings: Settings) -> dict[str, Any]:
    """`case_store` in the suite's shape (a title, its table with columns, no targets)."""
    case = case_store.run(settings)
    table = case.pop("table")
    table["columns"] = ["loader", "time", "resident", "resident / payload"]
    return {"title": "Bulk adapter loading (serving store)", "tables": [table], "targets": [], **case}


CASES: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "training": case_training.run,
    "memory": case_memory.run,
    "inference": case_inference.run,
    "mixed": case_mixed.run,
    "files": case_files.run,
    "scaling": case_scaling.run,
    "store": _store_case,
    "serving": case_serving.run,
    "generate": case_generate.run,
}
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI: checks it runs)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for results.json and report.md")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="cases to run")
    parser.add_argument(
        "--models", nargs="+", default=[], choices=list(MODELS), help="training, memory, inference: only these models"
    )
    parser.add_argument("--repeats", type=int, default=None, help="recorded rounds (the cases scale it per group)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other cases of an existing results.json in --out (rerun some)"
    )
    return parser.parse_args(argv)


def _save(results: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render(results))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases; a case that raises is recorded with its error (and the run goes on), then re-raised at the end."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.for_mode(args.quick, models=tuple(args.models), repeats=args.repeats)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": settings.__dict__,
        "cases": {},
    }
    previous = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        if old.get("mode") != results["mode"]:
            raise SystemExit(f"--merge: {previous} is a {old.get('mode')} run, this is a {results['mode']} run.")
        results["cases"] = {k: v for k, v in old["cases"].items() if k not in args.cases}
        results["merged_from"] = {"started": old["started"], "cases": sorted(results["cases"])}
        started -= old.get("duration_s", 0.0)
    failed = []
    for name in args.cases:
        t0 = time.perf_counter()
        print(f"[benchmarks] {name} ...", flush=True)
        try:
            case = CASES[name](settings)
        except Exception as exc:  # keep the other cases' numbers; the failure is reported and re-raised below
            traceback.print_exc()
            case = {"title": name, "error": f"{type(exc).__name__}: {exc}", "targets": []}
            failed.append(name)
        case["wall_s"] = time.perf_counter() - t0
        results["cases"][name] = case
        results["cases"] = {k: results["cases"][k] for k in CASES if k in results["cases"]}  # report in case order
        print(f"[benchmarks] {name} done in {case['wall_s']:.0f} s", flush=True)
        results["duration_s"] = time.perf_counter() - started
        results["loadavg_at_end"] = list(os.getloadavg())
        _save(results, args.out)  # after every case, so a long run that dies keeps what it measured
    if failed:
        raise SystemExit(f"benchmark cases failed: {failed} (see the tracebacks above and {args.out}/report.md)")
    return results


if __name__ == "__main__":
    main()
