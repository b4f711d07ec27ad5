"""The size/accuracy table and figure of compact adapters, from `eval_compact.py --json` and `train.py` results.

Reads one `eval_compact.py --json` file per (task, seed) and, optionally, the `results.json` of
`train.py --keep-fraction` runs (masked re-training); prints a Markdown table of the dev metric (mean ± sample
std over seeds) and the file size per form and task, and draws file size against dev metric, one marker per form.

    python examples/glue/compact_report.py --evals runs/compact/eval/*.json \
        --retrained runs/prune/sst2-k0.4-e1-lr1e-2/s*/results.json --figure docs/figures/compact_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

TASK_ORDER = ("sst2", "trec", "stsb")
TASK_TITLE = {"sst2": "SST-2 (accuracy)", "trec": "TREC (accuracy)", "stsb": "STS-B (Pearson)"}
FORM_LABEL = {"original": "fp32 (peft file)", "float32": "fp32 packed", "bfloat16": "bf16", "int8": "int8"}


def label(form: str) -> str:
    """`int8:0.25` -> `sparse 25% (int8)`; a re-trained form keeps its suffix."""
    dtype, _, keep = form.partition(":")
    if not keep:
        return FORM_LABEL.get(dtype, dtype)
    keep, _, suffix = keep.partition("+")
    return f"sparse {float(keep):.0%} ({dtype})" + (f" + {suffix}" if suffix else "")


def collect(evals: list[str], retrained: list[str]) -> dict[str, dict[str, list[tuple[float, int]]]]:
    """task -> form -> [(dev main metric, file bytes), one per seed]."""
    rows: dict[str, dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    for path in evals:
        with open(path) as f:
            data = json.load(f)
        for r in data["results"]:
            rows[data["task"]][r["form"]].append((r["metrics"][data["main_metric"]], r["file_bytes"]))
    for path in retrained:
        with open(path) as f:
            res = json.load(f)
        form = f"int8:{res['keep_fraction']}+re-trained {res['retrain_epochs']} ep"
        if res["retrain_lr"] != res["lr"]:
            form += f" lr {res['retrain_lr']:g}"
        rows[res["task"]][form].append((res["best"][res["main_metric"]], res["adapter_bytes"]))
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: dict[str, dict[str, list[tuple[float, int]]]]) -> str:
    """Markdown: one row per form, per task the dev metric (x100, mean ± std, and in brackets the difference of its
    mean from the fp32 adapters' mean) and the file size in bytes."""
    tasks = [t for t in TASK_ORDER if t in rows]
    forms: list[str] = []
    for t in tasks:
        forms += [f for f in rows[t] if f not in forms]
    head = "| form | " + " | ".join(f"{TASK_TITLE[t]} | {t} bytes" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(tasks)]
    for form in forms:
        cells = []
        for t in tasks:
            got = rows[t].get(form)
            if not got:
                cells += ["", ""]
                continue
            m, s = _mean_std([100 * v for v, _ in got])
            ref, _ = _mean_std([100 * v for v, _ in rows[t]["original"]])
            sizes = sorted({b for _, b in got})
            size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,}"
            n = f", n={len(got)}" if len(got) != len(rows[t]["original"]) else ""
            cells += [f"{m:.2f} ± {s:.2f} ({m - ref:+.2f}{n})", size]
        lines.append(f"| {label(form)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: dict[str, dict[str, list[tuple[float, int]]]], path: str, budget: dict[str, int]) -> None:
    """File size (log x) against dev metric, one panel per task, one marker per form (error bar: std over seeds)."""
    tasks = [t for t in TASK_ORDER if t in rows]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.8), squeeze=False)
    markers = "osD^v<>pP*Xh"
    forms: list[str] = []
    for t in tasks:
        forms += [f for f in rows[t] if f not in forms]
    colors = plt.get_cmap("tab20").colors
    style = {f: (markers[i % len(markers)], colors[(2 * i) % 20 + (2 * i) // 20 % 2]) for i, f in enumerate(forms)}
    for ax, t in zip(axes[0], tasks, strict=True):
        for form, got in rows[t].items():
            m, s = _mean_std([100 * v for v, _ in got])
            marker, color = style[form]
            ax.errorbar(statistics.mean(b for _, b in got), m, yerr=s, fmt=marker, color=color, label=label(form),
                        capsize=3, markersize=7)  # fmt: skip
        ref, _ = _mean_std([100 * v for v, _ in rows[t]["original"]])
        ax.axhline(ref - 0.5, color="grey", lw=0.8, ls="--", label="fp32 mean − 0.5 point")
        if t in budget:
            ax.axvline(budget[t], color="black", lw=0.8, ls=":", label=f"{budget[t]:,} B budget")
        ax.set_xscale("log")
        ax.set_xticks([2_000, 4_000, 8_000, 16_000, 32_000, 64_000])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("adapter file size (bytes, log scale)")
        ax.set_ylabel("dev metric ×100 (mean ± std, 3 seeds)")
        ax.set_title(TASK_TITLE[t])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("MiniLM b_q + b_m2 BitFit adapters (with head): file size vs dev metric per storage form")
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", nargs="+", required=True, help="eval_compact.py --json files")
    parser.add_argument("--retrained", nargs="*", default=[], help="results.json of train.py --keep-fraction runs")
    parser.add_argument("--figure", help="write the figure here (PNG)")
    parser.add_argument("--budget", nargs="*", default=["sst2=8000"], help="TASK=BYTES size goals drawn as lines")
    args = parser.parse_args(argv)
    rows = collect(args.evals, args.retrained)
    print(table(rows))
    if args.figure:
        figure(rows, args.figure, {k: int(v) for k, v in (b.split("=") for b in args.budget)})


if __name__ == "__main__":
    main()
