"""Dev accuracy, file size and max abs error of a BitFit adapter stored in compact forms (bitfit_peft.compact).

For each `--forms` entry (`float32`, `bfloat16`, `float16`, `int8`, each optionally `:KEEP` for sparse, e.g.
`int8:0.4`) the adapter is encoded, written as safetensors, read back, decoded, loaded into the same PeftModel with
`set_peft_model_state_dict`, and evaluated on the task's dev set. Standalone: needs only bitfit_peft, transformers,
peft, safetensors, datasets and scikit-learn.

    python examples/glue/eval_compact.py --adapter runs/compact/sst2/s0 --task sst2 \
        --data-dir ../shared/data/glue --forms float32 bfloat16 int8 int8:0.4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import datasets
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import bitfit_peft
from bitfit_peft import compact

TASKS = {  # task -> (file under --data-dir, reader)
    "sst2": "SST-2/dev.tsv",
    "trec": "TREC.test.all",
}


def load_dev(task: str, data_dir: str) -> datasets.Dataset:
    path = os.path.join(data_dir, TASKS[task])
    if task == "sst2":
        return datasets.load_dataset("csv", data_files=path, delimiter="\t", quoting=3)["train"].rename_column(
            "sentence", "text"
        )
    labels, texts = [], []
    with open(path, encoding="latin-1") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            labels.append(label)
            texts.append(text)
    names = sorted(set(labels))
    return datasets.Dataset.from_dict({"text": texts, "label": [names.index(x) for x in labels]})


def build(adapter: str, model_path: str | None) -> tuple[Any, Any]:
    """The base model the adapter was trained on, with the adapter loaded, and its tokenizer."""
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    path = model_path or config["base_model_name_or_path"]
    state = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    head = {k: v for k, v in state.items() if "bitfit_delta" not in k and k.endswith(".weight")}
    num_labels = next(iter(head.values())).shape[0]
    if any(".out_proj." in k for k in head) and not any(".dense." in k for k in head):
        base = bitfit_peft.MeanPooledSequenceClassifier.from_pretrained(path, num_labels=num_labels)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def accuracy(model: Any, tokenizer: Any, dev: datasets.Dataset, max_length: int, batch_size: int = 64) -> float:
    preds: list[int] = []
    for start in range(0, len(dev), batch_size):
        rows = dev[start : start + batch_size]
        batch = tokenizer(rows["text"], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        preds += model(**batch).logits.argmax(-1).tolist()
    return float(accuracy_score(dev["label"], preds))


def evaluate_form(model: Any, original: dict[str, torch.Tensor], form: str, evaluate: Any) -> dict[str, Any]:
    dtype, _, keep = form.partition(":")
    encoded = compact.encode(original, dtype, float(keep) if keep else None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter_model.safetensors")
        save_file(encoded, path, metadata={"format": "pt"})
        size = os.path.getsize(path)
        save_file(encoded, path, metadata=compact.safetensors_metadata(encoded))
        size_meta = os.path.getsize(path)
        decoded = compact.decode(load_file(path))
    deltas = [k for k in original if k.endswith("bitfit_delta")]
    err = {
        "deltas": max(float((decoded[k] - original[k].float()).abs().max()) for k in deltas),
        "all": max(float((decoded[k] - original[k].float()).abs().max()) for k in original),
    }
    result = set_peft_model_state_dict(model, decoded)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected keys after decode: {result.unexpected_keys[:3]}")
    layout = compact.read_layout(encoded)
    return {
        "form": form,
        "file_bytes": size,
        "file_bytes_with_module_metadata": size_meta,
        "payload_bytes": compact.payload_bytes(encoded),
        "positions": (layout.get("sparse") or {}).get("encoding"),
        "max_abs_error": err,
        "accuracy": evaluate(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="directory with adapter_model.safetensors (float32)")
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--data-dir", required=True, help="GLUE-layout dir (sst2) or the sentence/ dir (trec)")
    parser.add_argument("--model", help="base model path (default: the adapter config's base_model_name_or_path)")
    parser.add_argument("--forms", nargs="+", default=["float32", "bfloat16", "int8", "int8:0.4"])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    model, tokenizer = build(args.adapter, args.model)
    dev = load_dev(args.task, args.data_dir)
    original = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    baseline = accuracy(model, tokenizer, dev, args.max_length)
    print(f"{args.adapter}: original file {os.path.getsize(os.path.join(args.adapter, 'adapter_model.safetensors')):,} B, "
          f"dev accuracy {baseline:.4f}")  # fmt: skip
    results: list[dict[str, Any]] = [{"form": "original", "accuracy": baseline}]
    for form in args.forms:
        start = time.perf_counter()
        r = evaluate_form(model, original, form, lambda: accuracy(model, tokenizer, dev, args.max_length))
        results.append(r)
        print(
            f"{form:12s} file {r['file_bytes']:6,d} B (+module metadata {r['file_bytes_with_module_metadata']:6,d}) "
            f"payload {r['payload_bytes']:6,d} B  ratio {r['file_bytes'] / r['payload_bytes']:.3f}  "
            f"max|err| deltas {r['max_abs_error']['deltas']:.2e} all {r['max_abs_error']['all']:.2e}  "
            f"acc {r['accuracy']:.4f} ({r['accuracy'] - baseline:+.4f})  [{time.perf_counter() - start:.0f}s]",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"adapter": args.adapter, "task": args.task, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
