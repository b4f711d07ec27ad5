"""Case 4: mixed-task batches (one adapter per example) with k adapters in the batch and N resident on the model.

For each N the suite times, interleaved against the plain base model: one adapter set active (`single`, the
reference for the ≤ 1.10× target), a mixed batch over k adapters (`adapter_names=`), and the alternative without
mixed batches, one sub-batch per task with `set_adapter` in between. peft LoRA's own mixed batch runs the same way
on its own copy. Adapter creation time and resident memory are recorded at every N.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from .common import (
    MODELS,
    Settings,
    bitfit_missing,
    fmt_bytes,
    fmt_ratio,
    forward_fn,
    make_batch,
    make_variant,
    randomize_adapters,
    rss_bytes,
    target,
    tensor_bytes,
    timing_table,
    trim_heap,
)
from .timing import interleaved, paired_ratio

MODEL = "minilm"
# set_adapter costs the same at every N, so the sub-batch alternative does too: timing it at N <= 100 is enough
SUB_BATCH_MAX_N = 100
ADD_BUDGET_S = 60.0  # wall time given to add_adapter (quick: 0.2 s); further adapters use the fast path


def _names_for(k: int, resident: list[str], batch: int) -> list[str]:
    """Example i uses the (i mod k)-th of k adapters spread evenly over the resident ones."""
    step = max(1, len(resident) // k)
    chosen = [resident[(j * step) % len(resident)] for j in range(k)]
    return [chosen[i % k] for i in range(batch)]


def _sub_batches(model: Any, data: dict[str, torch.Tensor], names: list[str]) -> Any:
    """The no-mixed-batch alternative: one forward per task on its examples, set_adapter in between."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    parts = [(name, {k: v[idx] for k, v in data.items() if k != "labels"}) for name, idx in groups.items()]

    def run() -> None:
        with torch.inference_mode():
            for name, inputs in parts:
                model.set_adapter(name)
                model(**inputs)

    return run


def _fast_add(model: Any, name: str, config: Any) -> None:
    """Register one random delta per BitFit layer directly (used once add_adapter's time budget is spent).

    This is what `BitFitLayer.update_layer` stores, minus peft's `inject_adapter` around it, which walks every
    module and every parameter (all resident deltas included: `_mark_only_adapters_as_trainable`), so that
    add_adapter still grows with N (`creation` in the JSON has its time per call).
    """
    model.peft_config[name] = config
    for layer in model.base_model._bitfit_layers_cache:
        layer.bitfit_delta[name] = torch.nn.Parameter(torch.randn(layer._shape) * 0.05, requires_grad=False)
    # (adding a delta Parameter marks mixed-batch routing stale: it is rebuilt on the next mixed call)


def _grow(model: Any, config_fn: Any, names: list[str], n: int, log: dict[str, Any], budget_s: float) -> None:
    """Add adapters until `n` are resident; time add_adapter while within budget, then use `_fast_add`."""
    from bitfit_peft import BitFitLayer

    while len(names) < n:
        name = f"t{len(names)}"
        count = len(names) + 1
        if log["add_adapter_s"] < budget_s:
            start = time.perf_counter()
            model.add_adapter(name, config_fn())
            seconds = time.perf_counter() - start
            log["add_adapter_s"] += seconds
            log["add_adapter_count"] += 1
            if count in (2, 10, 100, 1000) or count % 250 == 0:
                log.setdefault("add_adapter_ms_at", {})[str(count)] = 1e3 * seconds
        else:
            if not hasattr(model.base_model, "_bitfit_layers_cache"):
                model.base_model._bitfit_layers_cache = [m for m in model.modules() if isinstance(m, BitFitLayer)]
                if any(len(m.bitfit_index) for m in model.base_model._bitfit_layers_cache):
                    raise ValueError("The fast path does not handle fused-QKV slices; use a model without them.")
            start = time.perf_counter()
            _fast_add(model, name, config_fn())
            log["fast_add_s"] += time.perf_counter() - start
            log["fast_add_count"] += 1
        names.append(name)


def run_bitfit(settings: Settings, out: dict[str, Any]) -> None:
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig

    batch, seq = settings.mixed_batch
    base_model = MODELS[MODEL](settings)
    data = make_batch(base_model, batch, seq)
    reference = make_variant("frozen", MODEL, base_model)
    trim_heap()
    rss0 = rss_bytes()
    model = get_peft_model(base_model, BitFitConfig(init_weights=False), adapter_name="t0")
    payload = tensor_bytes(p for n, p in model.named_parameters() if n.endswith(".t0"))
    names, log = ["t0"], {"add_adapter_s": 0.0, "add_adapter_count": 1, "fast_add_s": 0.0, "fast_add_count": 0}
    out["payload_bytes_per_adapter"] = payload
    for n in settings.mixed_ns:
        _grow(model, lambda: BitFitConfig(init_weights=False), names, n, log, 0.2 if settings.quick else ADD_BUDGET_S)
        gc.collect()
        trim_heap()
        mem = {"n": n, "rss_over_base": rss_bytes() - rss0, "adapter_param_bytes": tensor_bytes(
            p for name, p in model.named_parameters() if ".bitfit_delta." in name)}  # fmt: skip
        out["resident_memory"].append(mem)
        model.eval()
        fns: dict[str, Any] = {"base": forward_fn(reference, data)}
        model.set_adapter(names[-1])
        fns["single"] = forward_fn(model, data)
        for k in settings.mixed_ks:
            if k > n:
                continue
            mixed = _names_for(k, names, batch)
            fns[f"mixed k={k}"] = forward_fn(model, data, adapter_names=mixed)
            if k > 1 and n <= SUB_BATCH_MAX_N:
                fns[f"sub-batches k={k}"] = _sub_batches(model, data, mixed)
        start = time.perf_counter()
        model.set_adapter(names[0])
        mem["set_adapter_s"] = time.perf_counter() - start  # one call; the sub-batch path pays it once per task
        # the sub-batch runs call set_adapter: select the single adapter again (untimed) before each `single` call
        res = interleaved(
            fns, baseline="single", warmup=settings.warmup, repeats=settings.repeats + (1 if n <= 100 else -1),
            setups={"single": lambda: model.set_adapter(names[-1])},
        )  # fmt: skip
        for name in res["times"]:
            if name != "base":
                res.setdefault("vs_base", {})[name] = paired_ratio(res, name, "base")
        out["groups"].append({"n": n, "timing": res})
        gc.collect()
        trim_heap()
        mem["rss_after_mixed_forward"] = rss_bytes() - rss0  # + the per-layer packed tables of the mixed path
        extra = {k: {"vs base": fmt_ratio(v)} for k, v in res["vs_base"].items()}
        out["tables"].append(timing_table(f"BitFit, N = {n:,} resident, batch {batch}×{seq}", res, extra))
        for k in settings.mixed_ks:
            r = res["ratios"].get(f"mixed k={k}")
            if r is not None:
                out["targets"].append(target(f"mixed: k={k} ≤ 1.10× single adapter (N={n:,})", r, 1.10))
    out["creation"] = log


def run_lora(settings: Settings, out: dict[str, Any]) -> None:
    from peft import LoraConfig, get_peft_model

    batch, seq = settings.mixed_batch
    base_model = MODELS[MODEL](settings)
    data = make_batch(base_model, batch, seq)
    reference = make_variant("frozen", MODEL, base_model)

    def cfg() -> LoraConfig:
        return LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False)

    model = get_peft_model(base_model, cfg(), adapter_name="t0")
    names = ["t0"]
    start = time.perf_counter()
    for i in range(1, settings.lora_mixed_n):
        model.add_adapter(f"t{i}", cfg())
        names.append(f"t{i}")
    add_ms = 1e3 * (time.perf_counter() - start) / max(1, len(names) - 1)
    randomize_adapters(model)
    model.eval()
    model.set_adapter(names[-1])
    fns: dict[str, Any] = {"base": forward_fn(reference, data), "lora single": forward_fn(model, data)}
    for k in settings.mixed_ks:
        fns[f"lora mixed k={k}"] = forward_fn(model, data, adapter_names=_names_for(k, names, batch))
    res = interleaved(fns, baseline="lora single", warmup=settings.warmup, repeats=settings.repeats + 1)
    res["vs_base"] = {name: paired_ratio(res, name, "base") for name in res["times"] if name != "base"}
    out["lora"] = {"n": len(names), "add_adapter_ms_mean": add_ms, "timing": res}
    extra = {k: {"vs base": fmt_ratio(v)} for k, v in res["vs_base"].items()}
    out["tables"].append(timing_table(f"peft LoRA r=8, N = {len(names)} resident, batch {batch}×{seq}", res, extra))


def run(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"title": "Mixed-task batches", "groups": [], "tables": [], "targets": []}
    out["resident_memory"] = []
    missing = bitfit_missing()
    if missing:
        out["skipped"] = {"bitfit": missing}
    else:
        run_bitfit(settings, out)
        payload = out["payload_bytes_per_adapter"]
        rows = [[f"{m['n']:,}", fmt_bytes(m["adapter_param_bytes"]), fmt_bytes(m["rss_over_base"]),
                 f"{m['rss_over_base'] / max(1, m['n'] * payload):.2f}", fmt_bytes(m.get("rss_after_mixed_forward")),
                 f"{m.get('rss_after_mixed_forward', 0) / max(1, m['n'] * payload):.2f}",
                 f"{1e3 * m.get('set_adapter_s', 0):.0f} ms"]
                for m in out["resident_memory"]]  # fmt: skip
        out["tables"].append({
            "title": f"Resident adapters (all biases of {MODEL}: {fmt_bytes(payload)} payload each)",
            "columns": ["N", "delta tensors", "RSS over base", "RSS / (N × payload)", "RSS after mixed forwards",
                        "after / (N × payload)", "one set_adapter"], "rows": rows,
        })  # fmt: skip
    run_lora(settings, out)
    out["notes"] = [
        f"Model: the real MiniLM encoder (all biases targeted, {settings.mixed_batch[0]}×{settings.mixed_batch[1]} "
        "batch): BERT-base forwards take seconds on a shared 2-core CPU, too slow for a 4 × 7 grid.",
        f"add_adapter is timed until {ADD_BUDGET_S:.0f} s are spent; later adapters are registered directly in each "
        "layer's `bitfit_delta` (see `_fast_add`). `creation` in the JSON has add_adapter's time per call as N grows.",
        "`single` = one adapter set active with set_adapter, no adapter_names. `sub-batches` = one forward per task "
        f"with set_adapter in between, run for N ≤ {SUB_BATCH_MAX_N} only: one set_adapter costs the same at every "
        "N (`set_adapter_s` per N in the resident-memory table), so the sub-batch cost does not depend on N.",
    ]
    return out
