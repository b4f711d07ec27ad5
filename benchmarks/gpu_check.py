"""GPU check: correctness of the dtype and mixed-batch paths on CUDA, and the training and inference ratios on one GPU.

Run on a machine with a CUDA GPU: ``python -m benchmarks.gpu_check --out DIR``; writes ``DIR/gpu_check.json``.
``--device cpu --quick`` runs the same code on the tiny quick-mode model (a dry run of the script, for CI).
Correctness checks raise on failure. Timings reuse the suite's pieces: `common.bert_base` and `make_variant` build
the variants, `common.train_step_fn` / `forward_fn` make the calls, and `timing.interleaved` times them round-robin
against a baseline (each call followed by a device synchronise), so the ratios are per-round ratios, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import transformers
from peft import get_peft_model
from torch import nn

from .common import Batch, Settings, bert_base, forward_fn, make_batch, make_variant, randomize_adapters, train_step_fn
from .timing import interleaved, paired_ratio

MODEL = "bert-base"
MIXED_ADAPTERS = 32
TRAIN_KINDS = ("floor", "bitfit", "full")  # biases trained in place, BitFit (with its classifier head), everything


def _bert(settings: Settings, device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The suite's BERT-base-shaped classifier (tiny in quick mode) on `device` in `dtype`."""
    return bert_base(settings, classifier=True).to(device, dtype)


def check_correctness(device: str) -> dict[str, Any]:
    """bf16/fp16 bases with fp32 deltas, autocast, mixed batches and merge, on `device` (tiny model: size is moot)."""
    from bitfit_peft import BitFitConfig

    out: dict[str, Any] = {}
    quick = Settings.for_mode(True)
    x = make_batch(_bert(quick, device), 6, 16)
    labels = x.pop("labels")
    for dtype in (torch.bfloat16, torch.float16):
        base = _bert(quick, device, dtype)
        with torch.no_grad():
            ref = base(**x).logits.clone()
        model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS")).eval()
        deltas = {p.dtype for n, p in model.named_parameters() if "bitfit_delta" in n}
        with torch.no_grad():
            same = torch.equal(model(**x).logits, ref)
        model.train()
        model(**x, labels=labels).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "bitfit_delta" in n]
        finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        if not same or deltas != {torch.float32} or not finite:
            raise AssertionError(f"{dtype}: fresh==base {same}, delta dtypes {deltas}, finite grads {finite}")
        out[str(dtype)] = {"fresh_equals_base": same, "delta_dtype": "float32", "grads_finite": True}
    model = get_peft_model(_bert(quick, device), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    with torch.autocast(device, dtype=torch.bfloat16):  # fp32 base under autocast(bf16)
        loss = model(**x, labels=labels).loss
    loss.backward()
    out["autocast_bf16_loss"] = float(loss.detach())
    # mixed batch == one adapter at a time, and merged == unmerged
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


def _seq_cls(kind: str) -> dict[str, Any]:
    """BitFit on a classifier is configured with its task type (the head is trained and saved with the adapter)."""
    return {"task_type": "SEQ_CLS"} if kind == "bitfit" else {}


def _synced(fns: dict[str, Callable[[], None]], device: str) -> dict[str, Callable[[], None]]:
    """Each call followed by a device synchronise, so the timer sees the kernels finish, not just their launch."""
    if device != "cuda":
        return fns

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            fn()
            torch.cuda.synchronize()

        return call

    return {name: wrap(fn) for name, fn in fns.items()}


def _mixed_model(base: nn.Module, data: Batch) -> Callable[[], None]:
    """A forward whose batch spreads over `MIXED_ADAPTERS` resident BitFit adapters (one per example, round-robin)."""
    from bitfit_peft import BitFitConfig

    model = make_variant("bitfit", MODEL, base, task_type="SEQ_CLS")
    for i in range(1, MIXED_ADAPTERS):
        model.add_adapter(f"t{i}", BitFitConfig(task_type="SEQ_CLS"))
    randomize_adapters(model)
    adapters = ["default"] + [f"t{i}" for i in range(1, MIXED_ADAPTERS)]
    batch = len(data["input_ids"])
    return forward_fn(model, data, adapter_names=[adapters[i % MIXED_ADAPTERS] for i in range(batch)])


def time_bert_base(settings: Settings, device: str, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    """Training steps (fp32 model, bf16 autocast) and bf16 inference on BERT-base, as per-round ratios."""
    from .case_inference import build

    base = _bert(settings, device)
    data = make_batch(base, batch, seq)
    steps = {
        kind: train_step_fn(make_variant(kind, MODEL, base, **_seq_cls(kind)), data, autocast=torch.bfloat16)
        for kind in TRAIN_KINDS
    }
    train = interleaved(_synced(steps, device), baseline="floor", warmup=3, repeats=repeats)
    base = _bert(settings, device, torch.bfloat16)
    calls = {k: forward_fn(build(k, MODEL, base), data) for k in ("base", "bitfit", "bitfit-merged")}
    calls[f"mixed {MIXED_ADAPTERS} adapters"] = _mixed_model(base, data)
    infer = interleaved(_synced(calls, device), baseline="base", warmup=3, repeats=repeats)
    ratios = {
        "train_bitfit_over_floor": train["ratios"]["bitfit"],
        "train_bitfit_over_full": paired_ratio(train, "bitfit", "full"),
        "infer_unmerged_over_base": infer["ratios"]["bitfit"],
        "infer_merged_over_base": infer["ratios"]["bitfit-merged"],
        "infer_mixed_over_unmerged": paired_ratio(infer, f"mixed {MIXED_ADAPTERS} adapters", "bitfit"),
    }
    return {"batch": batch, "seq": seq, "repeats": repeats, "train": train, "infer": infer, "ratios": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for gpu_check.json")
    parser.add_argument("--repeats", type=int, default=30, help="recorded interleaved rounds per comparison")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 2 and 4 of 16 tokens (dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; run on a GPU machine or pass --device cpu.")
    import bitfit_peft

    settings = Settings.for_mode(args.quick)
    shapes = [(2, 16), (4, 16)] if args.quick else [(8, 128), (32, 128)]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitfit_peft": bitfit_peft.__version__,
        "correctness": check_correctness(args.device),
        "bert_base": [time_bert_base(settings, args.device, b, s, args.repeats) for b, s in shapes],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report["correctness"], indent=2))
    for r in report["bert_base"]:
        print(f"{r['batch']}×{r['seq']}", {k: round(v["median"], 3) for k, v in r["ratios"].items()})
    return report


if __name__ == "__main__":
    main()
