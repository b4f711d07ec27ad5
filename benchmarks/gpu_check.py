"""GPU check: correctness of the dtype and mixed-batch paths on CUDA, and the speed ratios of issue 4 on one GPU.

Run on a machine with a CUDA GPU: ``python -m benchmarks.gpu_check --out DIR``. Writes ``DIR/gpu_check.json``.
Correctness checks raise on failure; timings are ratios to a baseline measured interleaved in the same process
(A B A B ..., synchronised wall clock, median of the repeats after warm-up), never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from peft import get_peft_model

import bitfit_peft
from bitfit_peft import BitFitConfig, BitFitLayer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a dry run of the script itself


def _bert(size: str, dtype: torch.dtype = torch.float32) -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    dims = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
    cfg = transformers.BertConfig(**dims.get(size, {}))
    return transformers.BertForSequenceClassification(cfg).to(DEVICE, dtype).eval()


def _inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g).to(DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def check_correctness() -> dict[str, Any]:
    """bf16/fp16 bases with fp32 deltas, autocast, mixed batches and merge, all on CUDA."""
    out: dict[str, Any] = {}
    x = _inputs(6, 16)
    for dtype in (torch.bfloat16, torch.float16):
        base = _bert("tiny", dtype)
        with torch.no_grad():
            ref = base(**x).logits.clone()
        model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS")).eval()
        deltas = {p.dtype for n, p in model.named_parameters() if "bitfit_delta" in n}
        with torch.no_grad():
            same = torch.equal(model(**x).logits, ref)
        model.train()
        loss = model(**x, labels=torch.zeros(6, dtype=torch.long, device=DEVICE)).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "bitfit_delta" in n]
        if not same or deltas != {torch.float32} or any(g is None or not torch.isfinite(g).all() for g in grads):
            raise AssertionError(f"{dtype}: fresh==base {same}, delta dtypes {deltas}")
        out[str(dtype)] = {"fresh_equals_base": same, "delta_dtype": "float32", "grads_finite": True}
    # fp32 base under autocast(bf16)
    model = get_peft_model(_bert("tiny"), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(**x, labels=torch.zeros(6, dtype=torch.long, device=DEVICE)).loss
    loss.backward()
    out["autocast_bf16_loss"] = float(loss)
    # mixed batch == per example, and merge == unmerged, on CUDA
    model.add_adapter("q", BitFitConfig(task_type="SEQ_CLS", init_weights=False, bias_terms=["query"]))
    model.eval()
    names = ["q", "__base__", "default", "q", "default", "__base__"]
    with torch.no_grad():
        per = {}
        for name in ("default", "q"):
            model.set_adapter(name)
            per[name] = model(**x).logits
        with model.disable_adapter():
            per["__base__"] = model(**x).logits
        mixed = model(**x, adapter_names=names).logits
        err = max(float((mixed[i] - per[n][i]).abs().max()) for i, n in enumerate(names))
        model.set_adapter("default")
        model.merge_adapter()
        merge_err = float((model(**x).logits - per["default"]).abs().max())
    if err > 1e-4 or merge_err > 1e-3:
        raise AssertionError(f"mixed batch error {err}, merge error {merge_err}")
    out["mixed_max_abs_err"] = err
    out["merge_max_abs_err"] = merge_err
    return out


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def _train_step(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    labels = torch.zeros(x["input_ids"].shape[0], dtype=torch.long, device=DEVICE)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_bert_base(batch: int, seq: int, repeats: int, size: str = "base") -> dict[str, Any]:
    """Training step and inference on a BERT-base-shaped model (bf16 autocast), as ratios to the baselines."""
    x = _inputs(batch, seq)
    floor = _bert(size).train()
    for n, p in floor.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("classifier"))
    full = _bert(size).train()
    bitfit = get_peft_model(_bert(size), BitFitConfig(task_type="SEQ_CLS")).train()
    train = _interleaved(
        {"floor": _train_step(floor, x), "bitfit": _train_step(bitfit, x), "full": _train_step(full, x)}, repeats
    )
    base = _bert(size, torch.bfloat16)
    unmerged = get_peft_model(_bert(size, torch.bfloat16), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    unmerged.eval()
    merged = get_peft_model(_bert(size, torch.bfloat16), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    merged.eval().merge_adapter()
    mixed = get_peft_model(_bert(size, torch.bfloat16), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    for i in range(31):
        mixed.add_adapter(f"t{i}", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    mixed.eval()
    names = ["default"] + [f"t{i}" for i in range(31)]
    names = [names[i % 32] for i in range(batch)]

    def run(m: torch.nn.Module, **kw: Any) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                m(**x, **kw)

        return call

    infer = _interleaved(
        {
            "base": run(base),
            "unmerged": run(unmerged),
            "merged": run(merged),
            "mixed_32_adapters": run(mixed, adapter_names=names),
        },
        repeats,
    )
    ratio = {
        "train_bitfit_over_floor": train["bitfit"]["median_ms"] / train["floor"]["median_ms"],
        "train_bitfit_over_full": train["bitfit"]["median_ms"] / train["full"]["median_ms"],
        "infer_unmerged_over_base": infer["unmerged"]["median_ms"] / infer["base"]["median_ms"],
        "infer_merged_over_base": infer["merged"]["median_ms"] / infer["base"]["median_ms"],
        "infer_mixed32_over_unmerged": infer["mixed_32_adapters"]["median_ms"] / infer["unmerged"]["median_ms"],
    }
    return {"batch": batch, "seq": seq, "repeats": repeats, "train": train, "infer": infer, "ratios": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", default="base", choices=["base", "tiny"])
    args = parser.parse_args()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitfit_peft": bitfit_peft.__version__,
        "correctness": check_correctness(),
        "bert_base": [time_bert_base(b, 128, args.repeats, args.size) for b in (8, 32)],
    }
    n_layers = sum(isinstance(m, BitFitLayer) for m in get_peft_model(_bert("tiny"), BitFitConfig()).modules())
    report["tiny_layers_wrapped"] = n_layers
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "bert_base"}, indent=2))
    for r in report["bert_base"]:
        print(r["batch"], json.dumps(r["ratios"], indent=1))


if __name__ == "__main__":
    main()
