"""Dev metric and file size of a BitFit adapter stored in compact forms (bitfit_peft.compact), for any task.

For each `--forms` entry (`float32`, `bfloat16`, `float16`, `int8`, each optionally `:KEEP` for sparse, e.g.
`int8:0.4`) the adapter is encoded, written as safetensors, read back, decoded, loaded into the same PeftModel with
`set_peft_model_state_dict`, and scored on the task's dev set with the task's metrics, as `train.py` scores it
(the `glue_bitfit` package beside this script: same files, tokenization and metrics; STS-B reports Pearson).
A directory whose adapter file is already compact (written by `train.py --keep-fraction`) is scored as it is.

    python examples/glue/eval_compact.py --adapter runs/compact/stsb/s0 --task stsb \
        --data-dir ../shared/data/glue --forms float32 bfloat16 int8 int8:0.5 int8:0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch
from glue_bitfit.data import get_task, load_task, subsample, tokenize
from glue_bitfit.metrics import compute_metrics
from glue_bitfit.modeling import build_base_model
from glue_bitfit.tasks import TaskSpec
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, DataCollatorWithPadding

from bitfit_peft import compact

ADAPTER_FILE = "adapter_model.safetensors"


def build(adapter: str, model_path: str | None, task: TaskSpec) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The base model the adapter was trained on with the adapter loaded, its tokenizer, and the float32 state."""
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    path = model_path or config["base_model_name_or_path"]
    state = compact.decode(load_file(os.path.join(adapter, ADAPTER_FILE)))
    head = {k: v for k, v in state.items() if compact.DELTA_MARKER not in k and k.endswith(".weight")}
    # MeanPooledSequenceClassifier's head is `classifier.out_proj` alone; BERT's own is `classifier` (no out_proj).
    pooling = "mean" if any(".out_proj." in k for k in head) and not any(".dense." in k for k in head) else "cls"
    base = build_base_model(path, task.num_labels, pooling, task.is_regression)
    # Built from the config and filled with the decoded state: peft's from_pretrained cannot read a compact file
    # until BitFitConfig(save_dtype=...) lands.
    peft_config = PeftConfig.from_pretrained(adapter)
    peft_config.inference_mode = True
    model = get_peft_model(base, peft_config).eval()
    loaded = set_peft_model_state_dict(model, state)
    if loaded.unexpected_keys:
        raise RuntimeError(f"unexpected keys in {adapter}: {loaded.unexpected_keys[:3]}")
    return model, AutoTokenizer.from_pretrained(path), state


def dev_loader(task: TaskSpec, data_dir: str, tokenizer: Any, max_length: int, batch_size: int = 64) -> Any:
    """The dev set, tokenized and batched in length order (as train.py evaluates it)."""
    from torch.utils.data import DataLoader

    dev = tokenize(subsample(load_task(task, data_dir)["dev"], None, 0), tokenizer, max_length)
    lengths = [len(ids) for ids in dev["input_ids"]]
    dev = dev.select(sorted(range(len(dev)), key=lengths.__getitem__))
    return DataLoader(dev, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


@torch.inference_mode()
def score(model: Any, loader: Any, task: TaskSpec) -> dict[str, float]:
    """The task's dev metrics (`task.metrics`) for `model`."""
    preds, golds = [], []
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        preds.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).float())
        golds.append(batch["labels"])
    return compute_metrics(task.metrics, torch.cat(preds).numpy(), torch.cat(golds).numpy())


def encode_form(original: dict[str, torch.Tensor], form: str) -> dict[str, torch.Tensor]:
    """`compact.encode` for a form string `DTYPE[:KEEP]`."""
    dtype, _, keep = form.partition(":")
    return compact.encode(original, dtype, float(keep) if keep else None)


def file_sizes(encoded: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Bytes on disk without and with the module-order metadata, and the tensors read back from the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, ADAPTER_FILE)
        save_file(encoded, path, metadata={"format": "pt"})
        size = os.path.getsize(path)
        save_file(encoded, path, metadata=compact.safetensors_metadata(encoded))
        return size, os.path.getsize(path), load_file(path)


def evaluate_form(model: Any, original: dict[str, torch.Tensor], form: str, evaluate: Any) -> dict[str, Any]:
    """Encode `original` as `form`, write and read it back, load it into `model` and score it with `evaluate()`."""
    encoded = encode_form(original, form)
    size, size_meta, read_back = file_sizes(encoded)
    decoded = compact.decode(read_back)
    deltas = [k for k in original if k.endswith(compact.DELTA_MARKER)]
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
        "metrics": evaluate(),
    }


def run(
    adapter: str, task_name: str, data_dir: str, forms: list[str], model_path: str | None = None, max_length: int = 64
) -> dict[str, Any]:
    """Score the adapter as saved (`original`) and in every form; return the JSON-ready results."""
    task = get_task(task_name)
    model, tokenizer, original = build(adapter, model_path, task)
    loader = dev_loader(task, data_dir, tokenizer, max_length)
    baseline = score(model, loader, task)
    saved = os.path.getsize(os.path.join(adapter, ADAPTER_FILE))
    main = task.main_metric
    print(f"{adapter}: original file {saved:,} B, dev {main} {baseline[main]:.4f}", flush=True)
    results: list[dict[str, Any]] = [{"form": "original", "file_bytes": saved, "metrics": baseline}]
    for form in forms:
        start = time.perf_counter()
        r = evaluate_form(model, original, form, lambda: score(model, loader, task))
        results.append(r)
        print(
            f"{form:12s} file {r['file_bytes']:6,d} B (+module metadata {r['file_bytes_with_module_metadata']:6,d}) "
            f"payload {r['payload_bytes']:6,d} B  max|err| deltas {r['max_abs_error']['deltas']:.2e} "
            f"{main} {r['metrics'][main]:.4f} ({r['metrics'][main] - baseline[main]:+.4f})  "
            f"[{time.perf_counter() - start:.0f}s]",
            flush=True,
        )
    return {"adapter": adapter, "task": task.name, "main_metric": main, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help=f"directory with {ADAPTER_FILE} and adapter_config.json")
    parser.add_argument("--task", default="sst2", help="any train.py task, e.g. sst2, stsb, trec")
    parser.add_argument("--data-dir", required=True, help="as train.py's: GLUE-layout dir, or sentence/ for trec")
    parser.add_argument("--model", help="base model path (default: the adapter config's base_model_name_or_path)")
    parser.add_argument("--forms", nargs="*", default=["float32", "bfloat16", "int8", "int8:0.4"])
    parser.add_argument("--max-length", type=int, default=64, help="as the adapter was trained (run.sh: 64)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    out = run(args.adapter, args.task, args.data_dir, args.forms, args.model, args.max_length)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
