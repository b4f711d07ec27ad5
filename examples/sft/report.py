"""The results table of docs/sft.md (Markdown) from the `eval.json` files that `evaluate.py --json` wrote.

python examples/sft/report.py out/sft/*/eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ORDER = ("base zero-shot", "bitfit-bq-bm2", "bitfit-all", "lora-r8")
TASK_ORDER = ("sst2", "trec", "agnews")


def row(result: dict[str, Any]) -> str:
    """One table row: task, model, accuracy, trainable parameters, adapter bytes, training seconds, sizes."""
    trained = "train_seconds" in result

    def cell(key: str, fmt: str) -> str:
        return format(result[key], fmt) if trained else "–"

    return (
        f"| {result['task']} | {result['method']} | {result['accuracy']:.3f} | {result['eval_size']} | "
        f"{cell('train_size', 'd')} | {cell('steps', 'd')} | {cell('trainable_parameters', ',')} | "
        f"{cell('adapter_bytes', ',')} | {cell('train_seconds', '.0f')} |"
    )


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table, tasks in TASK_ORDER then models in ORDER."""

    def key(r: dict[str, Any]) -> tuple[int, int]:
        task = TASK_ORDER.index(r["task"]) if r["task"] in TASK_ORDER else len(TASK_ORDER)
        return task, ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER)

    head = (
        "| task | model | dev accuracy | dev examples | train examples | steps | trainable parameters | "
        "adapter_model.safetensors (bytes) | training (s) |\n|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head] + [row(r) for r in sorted(results, key=key)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="eval.json files from evaluate.py --json")
    args = parser.parse_args(argv)
    print(table([json.loads(f.read_text()) for f in args.files]))


if __name__ == "__main__":
    main()
