"""Render a reproduction grid (from `reproduce.py run`): Markdown tables and PNG figures.

Writes `<out>/results_table.md` (dev metric per task and variant, mean ± std over seeds at the (learning rate,
epochs) picked on the first seed, plus the whole sweep) and, under `<docs>/figures/`: `small_data.png` (dev metric
against train size), `loss_curves.png` (training loss per variant and learning rate) and `bias_change.png`
(the paper's Figure 1: per-layer, per-term `||Δb||_1 / dim` of the BitFit adapters).
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from statistics import mean, stdev
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "bitfit": "BitFit (all biases)",
    "bitfit_qm2": "BitFit b_q + b_m2",
    "bitfit_cls": "BitFit, [CLS] pooler head",
    "full": "Full fine-tuning",
    "full_cls": "Full FT, [CLS] pooler head",
    "head": "Head only",
    "lora": "LoRA (r=8)",
    "beft": "BEFT",
}


def load_runs(out: str) -> list[dict[str, Any]]:
    """Every finished run under `out` (`<task>/<variant>/lr<lr>/e<epochs>/n<size>/s<seed>/results.json`)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "lr*", "e*", "n*", "s*", "results.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_variant"] = path.split(os.sep)[-6]
        r["_dir"] = os.path.dirname(path)
        r["_score"] = r["best"][r["main_metric"]]
        runs.append(r)
    if not runs:
        raise ValueError(f"No finished run under '{out}': run `reproduce.py run --out {out}` first.")
    return runs


def main_size(runs: list[dict[str, Any]], task: str) -> int:
    """The train size of the task's sweep (the size with the most runs)."""
    counts: dict[int, int] = defaultdict(int)
    for r in runs:
        if r["task"] == task:
            counts[r["train_size"]] += 1
    return max(counts, key=lambda n: (counts[n], -n))


def pick(
    runs: list[dict[str, Any]], task: str, variant: str, size: int
) -> tuple[tuple[float, int], list[dict[str, Any]]] | None:
    """The (learning rate, epochs) that scored best on the first seed, and all seeds' runs at it."""
    cell = [r for r in runs if r["task"] == task and r["_variant"] == variant and r["train_size"] == size]
    if not cell:
        return None
    from .reproduce import best_config  # the driver's rule, so the table shows the setting the other seeds reran

    first_seed = min(r["seed"] for r in cell)
    config = best_config([r for r in cell if r["seed"] == first_seed], variant, task)
    return config, [r for r in cell if (r["lr"], r["epochs"]) == config]


def _fmt(values: list[float]) -> str:
    scale = [100 * v for v in values]
    return f"{mean(scale):.1f} ± {stdev(scale):.1f}" if len(scale) > 1 else f"{scale[0]:.1f}"


def table(runs: list[dict[str, Any]]) -> str:
    tasks = sorted(
        {r["task"] for r in runs},
        key=lambda t: ["sst2", "stsb", "trec"].index(t) if t in ("sst2", "stsb", "trec") else 9,
    )
    variants = [v for v in LABELS if any(r["_variant"] == v for r in runs)]
    metric = {t: next(r["main_metric"] for r in runs if r["task"] == t) for t in tasks}
    head = (
        "| method | trainable params | "
        + " | ".join(f"{t} ({metric[t]}, n={main_size(runs, t)})" for t in tasks)
        + " |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    last_lines = [head.replace("trainable params", "mean wall s per run"), lines[1]]
    for v in variants:
        cells, last, params, walls = [], [], "", []
        for t in tasks:
            got = pick(runs, t, v, main_size(runs, t))
            if got is None:
                cells.append("–")
                last.append("–")
                continue
            (lr, epochs), cell = got
            params = params or f"{cell[0]['trainable_params']:,} ({t})"  # the head's size depends on the task
            seeds = f"{len(cell)} seed{'s' if len(cell) > 1 else ''}"
            cells.append(f"{_fmt([r['_score'] for r in cell])} (lr {lr:g}, {epochs} ep, {seeds})")
            last.append(_fmt([r["dev"][-1][r["main_metric"]] for r in cell]))
            walls.append(f"{mean(r.get('wall_time_s', 0) for r in cell):.0f} ({t})")
        lines.append(f"| {LABELS[v]} | {params} | " + " | ".join(cells) + " |")
        last_lines.append(f"| {LABELS[v]} | {', '.join(walls)} | " + " | ".join(last) + " |")
    sweep = [
        "| task | method | lr | epochs | n | seed | best dev | best epoch | per-epoch dev | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(LABELS)
    for r in sorted(
        runs, key=lambda r: (r["task"], order.index(r["_variant"]), r["train_size"], r["lr"], r["epochs"], r["seed"])
    ):
        per_epoch = ", ".join(f"{100 * e[r['main_metric']]:.1f}" for e in r["dev"])
        sweep.append(
            f"| {r['task']} | {r['_variant']} | {r['lr']:g} | {r['epochs']} | {r['train_size']} | {r['seed']} | "
            f"{100 * r['_score']:.1f} | "
            f"{r['best']['epoch']} | {per_epoch} | {r.get('wall_time_s', 0):.0f} |"
        )
    total = sum(r.get("wall_time_s", 0) for r in runs)
    return (
        "### Dev metric (×100), mean ± std over seeds\n\n" + "\n".join(lines) + "\n\n"
        "### The same settings at the last epoch (no best-epoch selection on dev)\n\n" + "\n".join(last_lines) + "\n\n"
        f"### Every run ({len(runs)} runs, {total / 60:.0f} min of training wall time)\n\n" + "\n".join(sweep) + "\n"
    )  # fmt: skip


def plot_small_data(runs: list[dict[str, Any]], path: str, task: str = "sst2") -> None:
    """Dev metric against train size: mean over seeds at each size's picked setting, bars = min to max."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    seeds = set()
    for v in ("bitfit", "bitfit_qm2", "full", "head"):
        sizes = sorted({r["train_size"] for r in runs if r["task"] == task and r["_variant"] == v})
        xs, ys, lo, hi = [], [], [], []
        main = pick(runs, task, v, main_size(runs, task))
        for n in sizes:
            # Every size at the setting picked at the sweep's size (as reproduce.py runs the curve), if it ran.
            at_main = [r for r in runs if (r["task"], r["_variant"], r["train_size"]) == (task, v, n)]
            at_main = [r for r in at_main if main and (r["lr"], r["epochs"]) == main[0]]
            got = (main[0], at_main) if main and at_main else pick(runs, task, v, n)
            if got:
                scores = [100 * r["_score"] for r in got[1]]
                seeds.add(len(scores))
                xs.append(n)
                ys.append(mean(scores))
                lo.append(mean(scores) - min(scores))
                hi.append(max(scores) - mean(scores))
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[v])
    ax.set_xscale("log")
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"{task} dev {'accuracy' if task != 'stsb' else 'Pearson'} (×100)")
    span = f"{min(seeds)}–{max(seeds)} seeds" if len(seeds) > 1 else f"{next(iter(seeds), 0)} seed(s)"
    ax.set_title(f"Small-data curve ({task}; mean, min–max over {span})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(runs: list[dict[str, Any]], path: str) -> None:
    """Training loss against epoch, first seed, per task: the picked setting bold, the rest of the sweep thin."""
    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    colors = dict(zip(LABELS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, task in zip(axes[0], tasks, strict=True):
        n = main_size(runs, task)
        for v in LABELS:
            got = pick(runs, task, v, n)
            if got is None:
                continue
            first_seed = min(r["seed"] for r in got[1])
            for r in runs:
                if (r["task"], r["_variant"], r["train_size"], r["seed"]) != (task, v, n, first_seed):
                    continue
                if not r["train_loss"]:
                    continue
                steps, losses = zip(*r["train_loss"], strict=True)
                xs = [s / r["dev"][0]["step"] for s in steps]  # dev[0] is evaluated after epoch 1
                picked = (r["lr"], r["epochs"]) == got[0]
                ax.plot(
                    xs,
                    losses,
                    color=colors[v],
                    lw=1.6 if picked else 0.6,
                    alpha=1.0 if picked else 0.45,
                    label=f"{v} (lr {r['lr']:g}, {r['epochs']} ep)" if picked else None,
                )
        ax.set_title(f"{task}: training loss (n={n}, first seed)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _load_bitfit(run: dict[str, Any], model_path: str | None) -> Any:
    from peft import PeftModel

    import bitfit_peft  # noqa: F401

    from .modeling import build_base_model
    from .tasks import get_task

    task = get_task(run["task"])
    base = build_base_model(model_path or run["model"], task.num_labels, run["pooling"], task.is_regression)
    return PeftModel.from_pretrained(base, os.path.join(run["_dir"], "final"))


def plot_bias_change(runs: list[dict[str, Any]], path: str, model_path: str | None) -> dict[str, Any]:
    """Heatmap per task of the all-bias BitFit run (seed 0, picked lr); returns the matrices for the docs."""
    from bitfit_peft.analysis import bias_changes, change_matrix

    tasks = sorted({r["task"] for r in runs if r["_variant"] == "bitfit"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    out: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        got = pick(runs, task, "bitfit", main_size(runs, task))
        if got is None:
            continue
        run = min(got[1], key=lambda r: r["seed"])  # first seed at the picked setting
        terms, layers, matrix = change_matrix(bias_changes(_load_bitfit(run, model_path)))
        out[task] = {"terms": list(terms), "layers": layers, "matrix": matrix.round(5).tolist(), "lr": run["lr"]}
        im = ax.imshow(matrix, cmap="viridis", aspect="auto")
        ax.set_yticks(
            range(len(terms)),
            [{"intermediate": "intermediate (b_m2)", "query": "query (b_q)"}.get(t, t) for t in terms],
            fontsize=7,
        )
        ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{task} (lr {run['lr']:g})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("BitFit: ||Δb||₁ / dim per term and layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return out


def render(out: str, docs: str, model_path: str | None = None) -> None:
    """Write the tables to `<out>/results_table.md` and the figures to `<docs>/figures/`."""
    runs = load_runs(out)
    figures = os.path.join(docs, "figures")
    os.makedirs(figures, exist_ok=True)
    text = table(runs)
    if any(r["task"] == "sst2" for r in runs):
        plot_small_data(runs, os.path.join(figures, "small_data.png"))
    plot_loss_curves(runs, os.path.join(figures, "loss_curves.png"))
    if any(r["_variant"] == "bitfit" for r in runs):
        matrices = plot_bias_change(runs, os.path.join(figures, "bias_change.png"), model_path)
        rows = []
        for task, m in matrices.items():
            rows += [
                f"| {task} | {t} | " + " | ".join(f"{v:.4f}" for v in vals) + " |"
                for t, vals in zip(m["terms"], m["matrix"], strict=True)
            ]
        layers = next(iter(matrices.values()))["layers"] if matrices else []
        text += (
            "\n### ||Δb||₁ / dim per term and layer (BitFit, seed 0)\n\n| task | term | "
            + " | ".join(f"L{i}" for i in layers)
            + " |\n"
        )
        text += "|" + "---|" * (len(layers) + 2) + "\n" + "\n".join(rows) + "\n"
    with open(os.path.join(out, "results_table.md"), "w") as f:
        f.write(text)
    print(text)
