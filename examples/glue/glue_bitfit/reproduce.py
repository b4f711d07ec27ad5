"""Run a BitFit reproduction grid with `train.py`, then render its table and figures (`report.py`).

The grid is tasks x variants x learning rates x epochs on the first seed at one train size (the sweep); the
other seeds rerun the (learning rate, epochs) the sweep picked per task and variant on dev, as the paper picked
per task; then a small-data curve runs the curve variants at several train sizes with the setting picked on the
curve task. Runs go `--jobs` at a time. Finished runs (with a results.json) are skipped, so an interrupted grid
continues where it stopped.

    python examples/glue/reproduce.py run --model "$MINILM" --data-root ../shared/data --out runs/repro
    python examples/glue/reproduce.py report --out runs/repro --docs docs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .tasks import GLUE_TASKS, get_task

# Each run is a fresh process. From a checkout, `examples/glue/train.py` beside this package: Python puts its
# directory first on the child's sys.path, so the child runs this same copy of the package (the one under test),
# not another one installed in the environment. Installed without the scripts: the installed module.
_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
TRAIN_COMMAND = [sys.executable, _SCRIPT] if os.path.isfile(_SCRIPT) else [sys.executable, "-m", "glue_bitfit.train"]

# variant name -> (train.py --method, --bias-terms, --pooling)
VARIANTS: dict[str, tuple[str, list[str] | None, str]] = {
    "bitfit": ("bitfit", None, "auto"),
    "bitfit_qm2": ("bitfit", ["query", "intermediate"], "auto"),
    "bitfit_cls": ("bitfit", None, "cls"),
    "full": ("full", None, "auto"),
    "full_cls": ("full", None, "cls"),
    "head": ("head", None, "auto"),
    "lora": ("lora", None, "auto"),
    "beft": ("beft", None, "auto"),
}


@dataclass(frozen=True)
class Run:
    """One train.py run of the grid."""

    task: str
    variant: str
    lr: float
    train_size: int
    seed: int
    epochs: int

    def path(self, out: str) -> str:
        return os.path.join(
            out, self.task, self.variant, f"lr{self.lr:g}", f"e{self.epochs}", f"n{self.train_size}", f"s{self.seed}"
        )


def parse_per_variant(spec: list[str], option: str = "--lrs", kind: type = float) -> dict[str, list]:
    """`["bitfit=1e-3,1e-2", "full=5e-5"]` -> {"bitfit": [0.001, 0.01], "full": [5e-05]} (also `--epoch-grid`)."""
    out: dict[str, list] = {}
    for item in spec:
        name, sep, values = item.partition("=")
        try:
            if not sep or name not in VARIANTS:
                raise ValueError
            out[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            what = "LR" if kind is float else "EPOCHS"
            raise ValueError(
                f"Bad {option} entry '{item}': write VARIANT={what}[,{what}...] with VARIANT in {list(VARIANTS)}."
            ) from None
    return out


def data_dir_for(task: str, data_root: str) -> str:
    """GLUE tasks read `<root>/glue`, the single-sentence ones `<root>/sentence`."""
    return os.path.join(data_root, "glue" if task in GLUE_TASKS else "sentence")


def execute(run: Run, args: argparse.Namespace) -> dict:
    """Run (or reuse) one grid cell and return its results.json."""
    out = run.path(args.out)
    results = os.path.join(out, "results.json")
    if not os.path.isfile(results):
        method, bias_terms, pooling = VARIANTS[run.variant]
        if os.path.isdir(out):
            shutil.rmtree(out)  # a run that died part-way: start it again
        cmd = [
            *TRAIN_COMMAND, "--model", args.model, "--task", run.task,
            "--data-dir", data_dir_for(run.task, args.data_root), "--method", method, "--pooling", pooling,
            "--lr", str(run.lr), "--epochs", str(run.epochs), "--train-size", str(run.train_size),
            "--seed", str(run.seed), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--output-dir", out, "--no-checkpoints", "--num-threads", str(args.num_threads), "--log-every", "5",
        ]  # fmt: skip
        if args.dev_size:
            cmd += ["--dev-size", str(args.dev_size)]
        if bias_terms:
            cmd += ["--bias-terms", *bias_terms]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        t0 = time.time()
        log_path = out.rstrip("/") + ".log"
        with open(log_path, "w") as log:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(args.num_threads)}
            )
        if proc.returncode != 0:
            raise RuntimeError(f"run failed ({proc.returncode}), see {log_path}: {' '.join(cmd)}")
        if VARIANTS[run.variant][0] != "bitfit":  # only BitFit adapters feed the heatmap; drop big weights
            for sub in ("", "final"):
                for f in ("trainable.safetensors", "adapter_model.safetensors"):
                    p = os.path.join(out, sub, f)
                    if os.path.isfile(p) and os.path.getsize(p) > 5_000_000:
                        os.remove(p)
        print(f"[{time.strftime('%H:%M:%S')}] {out}: {time.time() - t0:.0f}s", flush=True)
    with open(results) as f:
        return json.load(f)


def best_config(results: list[dict], variant: str, task: str) -> tuple[float, int]:
    """The (learning rate, epochs) with the highest mean best-epoch dev metric over seeds."""
    by_config: dict[tuple[float, int], list[float]] = {}
    for r in results:
        if r["_variant"] == variant and r["task"] == task:
            by_config.setdefault((r["lr"], r["epochs"]), []).append(r["best"][r["main_metric"]])
    if not by_config:
        raise ValueError(f"No sweep result for variant '{variant}' on task '{task}'.")
    return max(by_config, key=lambda c: sum(by_config[c]) / len(by_config[c]))


def run_all(runs: list[Run], args: argparse.Namespace) -> list[dict]:
    """Execute `runs`, `args.jobs` at a time (each a subprocess of `args.num_threads` threads), in order."""
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda run: execute(run, args), runs))
    return [{**r, "_variant": run.variant} for run, r in zip(runs, results, strict=True)]


def cmd_run(args: argparse.Namespace) -> None:
    lrs = parse_per_variant(args.lrs)
    epochs = {v: [args.epochs] for v in VARIANTS} | parse_per_variant(args.epoch_grid, "--epoch-grid", int)
    for v in args.variants + (args.curve_variants if args.curve_sizes else []):
        if v not in lrs:
            raise ValueError(f"Variant '{v}' has no learning rate: add --lrs {v}=LR.")
    for t in args.tasks:
        get_task(t)
    start = time.time()
    # Sweep learning rates x epochs on the first seed; the other seeds rerun the setting it picked per task.
    sweep = [
        Run(t, v, lr, args.train_size, args.seeds[0], e)
        for t in args.tasks
        for v in args.variants
        for lr in lrs[v]
        for e in epochs[v]
    ]
    done = run_all(sweep, args)
    seeds = [
        Run(t, v, lr, args.train_size, s, e)
        for t in args.tasks
        for v in args.variants
        for lr, e in [best_config(done, v, t)]
        for s in args.seeds[1:]
    ]
    done += run_all(seeds, args)

    def curve_config(v: str) -> tuple[float, int]:
        if v in args.variants and args.curve_task in args.tasks:
            return best_config(done, v, args.curve_task)
        return lrs[v][0], epochs[v][0]

    curve = [
        Run(args.curve_task, v, lr, size, s, e)
        for size in args.curve_sizes
        for v in args.curve_variants
        for lr, e in [curve_config(v)]
        for s in args.curve_seeds
    ]
    run_all(curve, args)
    print(f"grid done in {time.time() - start:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="Run the grid (skips finished runs).")
    r.add_argument("--model", required=True)
    r.add_argument("--data-root", default="../shared/data", help="Holds glue/ and sentence/.")
    r.add_argument("--out", default="runs/repro")
    r.add_argument("--tasks", nargs="+", default=["sst2", "stsb", "trec"])
    r.add_argument("--variants", nargs="+", default=["bitfit", "bitfit_qm2", "full", "head"], choices=list(VARIANTS))
    r.add_argument(
        "--lrs",
        nargs="+",
        default=[
            "bitfit=1e-3,1e-2",
            "bitfit_qm2=1e-2",
            "bitfit_cls=1e-2",
            "full=3e-5,1e-4",
            "full_cls=1e-4",
            "head=1e-2",
            "lora=1e-3",
            "beft=1e-2",
        ],
    )
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="The first seed sweeps the learning rates.")
    r.add_argument("--train-size", type=int, default=500)
    r.add_argument("--epochs", type=int, default=3, help="Epochs of every variant not in --epoch-grid.")
    r.add_argument("--epoch-grid", nargs="*", default=[], help="Epochs to sweep per variant: VARIANT=E[,E...].")
    r.add_argument("--curve-task", default="sst2")
    r.add_argument(
        "--curve-variants", nargs="+", default=["bitfit", "bitfit_qm2", "full", "head"], choices=list(VARIANTS)
    )
    r.add_argument("--curve-sizes", nargs="*", type=int, default=[250, 1000])
    r.add_argument("--curve-seeds", nargs="+", type=int, default=[0])
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--max-length", type=int, default=64)
    r.add_argument("--dev-size", type=int, default=500, help="Fixed dev subset per task (0 = whole dev set).")
    r.add_argument("--num-threads", type=int, default=1, help="Torch threads per run.")
    r.add_argument("--jobs", type=int, default=1, help="Runs at a time (jobs x threads <= cores).")
    rep = sub.add_parser("report", help="Render the Markdown table and PNG figures from finished runs.")
    rep.add_argument("--out", default="runs/repro")
    rep.add_argument("--docs", default="docs", help="Writes <docs>/figures/*.png (and <out>/results_table.md).")
    rep.add_argument("--model", default=None, help="Base model, to reload BitFit adapters for the heatmap.")
    args = p.parse_args(argv)
    try:
        if args.command == "run":
            cmd_run(args)
        else:
            from .report import render

            render(args.out, args.docs, args.model)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
