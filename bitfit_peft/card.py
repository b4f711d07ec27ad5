"""The README.md model card of a shared BitFit adapter: what someone loading it onto their own base model needs.

`adapter_info` gathers the facts from an adapter's config dict and its saved tensors (packed or not); `model_card`
renders them as Markdown with YAML front matter in the form peft and the Hub use (`library_name: peft`,
`base_model: ...`, tags). `write_card` does both for a saved adapter directory: `BitFitConfig.save_pretrained` calls
it, so every `model.save_pretrained` leaves a README.md beside adapter_config.json, and a training script calls it
again with the dev metrics (kept in `eval_results.json` beside it, the file name HF's Trainer uses, so a later save
keeps them). The `bitfit-peft inspect` command reads the same `adapter_info`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from . import compact
from .constants import CARD_NAME, METRICS_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .constants import DELTA_ATTR as DELTA_MARKER
from .files import read_adapter_config, read_safetensors

_PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "FEATURE_EXTRACTION": "feature-extraction",
}

__all__ = ["adapter_info", "model_card", "read_eval_results", "write_card"]


def adapter_info(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    file_bytes: int | None = None,
    labels: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """The facts a model card and `bitfit-peft inspect` show, from an adapter config dict and its saved tensors.

    Args:
        config (`dict`): the adapter_config.json contents (or `BitFitConfig.to_dict()`).
        tensors (`dict[str, torch.Tensor]`): the tensors as saved (packed by `compact.encode` or one per key).
        file_bytes (`int`, *optional*): size of adapter_model.safetensors.
        labels (`list[str]`, *optional*): the task's label names (e.g. from the base model's `id2label`).
        metrics (`dict[str, float]`, *optional*): dev metrics, e.g. `{"accuracy": 0.814}`.
        task (`str`, *optional*): the dataset or task name the metrics are on, e.g. `"sst2"`.
    """
    packed = compact.is_packed(tensors)
    layout = compact.read_layout(tensors) if packed else None
    if layout is not None:
        delta_keys = list(layout["keys"])
        delta_params = sum(int(torch.Size(s).numel()) for s in layout["shapes"])
        heads = {
            k: v
            for k, v in tensors.items()
            if k not in (compact.LAYOUT_KEY, compact.PACKED_KEY, compact.POSITIONS_KEY)
        }
        dtype = layout["dtype"]
        keep = (layout.get("sparse") or {}).get("keep_fraction")
    else:
        delta_keys = [k for k in tensors if k.endswith(DELTA_MARKER)]
        delta_params = sum(tensors[k].numel() for k in delta_keys)
        heads = {k: v for k, v in tensors.items() if k not in delta_keys}
        dtypes = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in delta_keys})
        dtype = dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)
        keep = None
    return {
        "peft_type": str(config.get("peft_type")),
        "base_model": config.get("base_model_name_or_path"),
        "base_model_fingerprint": config.get("base_fingerprint"),
        "task_type": config.get("task_type"),
        "bias_terms": sorted(config["bias_terms"]) if config.get("bias_terms") else None,
        "target_modules": sorted(config["target_modules"]) if isinstance(config.get("target_modules"), list) else config.get("target_modules"),
        "modules": len(delta_keys),
        "delta_params": int(delta_params),
        "head_params": int(sum(v.numel() for v in heads.values())),
        "head_tensors": sorted(heads),
        "dtype": dtype,
        "keep_fraction": keep,
        "packed": packed,
        "payload_bytes": compact.payload_bytes(tensors),
        "file_bytes": file_bytes,
        "labels": labels,
        "metrics": metrics,
        "task": task,
        "peft_version": config.get("peft_version"),
    }  # fmt: skip


def model_card(info: dict[str, Any]) -> str:
    """Markdown model card (YAML front matter + body) from `adapter_info`'s dict.

    Example:

    >>> card = model_card({"base_model": "bert-base-uncased", "bias_terms": ["query"], "delta_params": 9216})
    >>> card.splitlines()[1]
    'base_model: "bert-base-uncased"'
    """
    base = info.get("base_model")
    front = ["---"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front.append("library_name: peft")
    tags = ["bitfit", "peft", *([f"base_model:adapter:{base}"] if base else [])]
    front += ["tags:", *(f"- {json.dumps(t)}" for t in tags)]
    pipeline = _PIPELINE_TAGS.get(str(info.get("task_type")))
    if pipeline:
        front.append(f"pipeline_tag: {pipeline}")
    front.append("---")

    terms = info.get("bias_terms") or info.get("target_modules") or "every bias"
    terms_text = ", ".join(terms) if isinstance(terms, list) else str(terms)
    rows = [
        ("Base model", f"`{base}`" if base else "unknown"),
        ("Base model fingerprint", f"`{info['base_model_fingerprint']}`" if info.get("base_model_fingerprint") else "not recorded"),
        ("Bias terms", terms_text),
        ("Bias vectors", _num(info.get("modules"))),
        ("Trained parameters", f"{_num(info.get('delta_params'))} bias deltas + {_num(info.get('head_params'))} task head"),
        ("Storage", _storage(info)),
    ]  # fmt: skip
    if info.get("task_type"):
        rows.append(("Task type", str(info["task_type"])))
    if info.get("labels"):
        rows.append(("Labels", ", ".join(f"{i}: {name}" for i, name in enumerate(info["labels"]))))
    body = [
        "",
        f"# BitFit adapter{' for ' + info['task'] if info.get('task') else ''}",
        "",
        "Bias-only fine-tuning (BitFit, Ben Zaken et al., ACL 2022) of the base model below, as a "
        "bitfit-peft adapter: it stores only the change of the targeted biases "
        "(and the task head), so it must be loaded onto the same base model.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    if info.get("metrics"):
        on = f" on {info['task']}" if info.get("task") else ""
        body += ["", f"## Evaluation{on} (dev)", "", "| metric | value |", "|---|---|"]
        body += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info["metrics"].items()
        ]
    body += [
        "",
        "## Usage",
        "",
        "```python",
        "import bitfit_peft  # registers BitFit with peft",
        "from peft import PeftModel",
        "",
        "model = PeftModel.from_pretrained(base_model, ADAPTER_DIR)  # base_model: the model above",
        "```",
        "",
        "Check that it fits your base model first: `bitfit-peft verify ADAPTER_DIR --base MODEL`. Loading onto a base "
        "whose fingerprint differs from the one above warns; inside "
        '`bitfit_peft.files.load_policy(on_fingerprint_mismatch="error")` it raises.',
        "",
    ]
    if info.get("peft_version"):
        body += ["### Framework versions", "", f"- PEFT {info['peft_version']}", ""]  # the line peft itself adds
    return "\n".join(front + body)


def write_card(directory: str, metrics: dict[str, float] | None = None, task: str | None = None) -> str:
    """Write `directory/README.md` for the adapter saved there; return its path.

    Args:
        directory (`str`): an adapter directory (adapter_config.json and its weights file).
        metrics (`dict[str, float]`, *optional*): dev metrics, e.g. `{"accuracy": 0.912}`. They are also written to
            `eval_results.json` in `directory`; unset: the metrics already there (if any) are shown.
        task (`str`, *optional*): the dataset or task the metrics are on (e.g. `"sst2"`), kept with them.

    Example:

    >>> write_card("out/sst2", metrics={"accuracy": 0.912}, task="sst2")  # doctest: +SKIP
    'out/sst2/README.md'
    """
    config = read_adapter_config(directory)  # rendered as saved
    if metrics is not None:
        with open(os.path.join(directory, METRICS_NAME), "w", encoding="utf-8") as f:
            json.dump({**({"task": task} if task else {}), **metrics}, f, indent=1)
    else:
        metrics, saved_task = read_eval_results(directory)
        task = task or saved_task
    weights = os.path.join(directory, WEIGHTS_NAME)
    tensors: dict[str, torch.Tensor] = {}
    size = None
    if os.path.isfile(weights):
        tensors, _ = read_safetensors(weights, verify_finite=False)
        size = os.path.getsize(weights)
    elif os.path.isfile(os.path.join(directory, PICKLE_WEIGHTS_NAME)):  # save_pretrained(safe_serialization=False)
        pickle_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
        tensors = torch.load(pickle_path, map_location="cpu", weights_only=True)
        size = os.path.getsize(pickle_path)
    info = adapter_info(config, tensors, file_bytes=size, labels=config.get("labels"), metrics=metrics, task=task)
    path = os.path.join(directory, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(info))
    return path


def read_eval_results(directory: str) -> tuple[dict[str, float] | None, str | None]:
    """The dev metrics and the task they are on, from `directory/eval_results.json` as `write_card` writes it;
    `(None, None)` without one. A broken file reads as no metrics: it must not stop `save_pretrained` or
    `bitfit-peft inspect`, which then just show none."""
    try:
        with open(os.path.join(directory, METRICS_NAME), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None, None
    saved = saved if isinstance(saved, dict) else {}
    metrics = {k: v for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return metrics or None, saved.get("task") if isinstance(saved.get("task"), str) else None


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "unknown"


def _storage(info: dict[str, Any]) -> str:
    parts = [str(info.get("dtype", "unknown"))]
    if info.get("keep_fraction"):
        parts.append(f"sparse, largest {info['keep_fraction']:.0%} kept")
    if info.get("packed"):
        parts.append("packed")
    if info.get("file_bytes"):
        parts.append(f"{info['file_bytes']:,} bytes on disk")
    return ", ".join(parts)
