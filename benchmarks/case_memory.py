"""Case 2: peak training memory (process RSS and torch allocator figures) and optimizer-state bytes.

Each (model, batch, variant) runs in a fresh spawned process so one variant's peak cannot hide another's: the
process builds the variant, takes one warm-up step (AdamW allocates its state lazily), resets the kernel's peak-RSS
counter (`/proc/self/clear_refs`), takes a second step and reads the peak back; a third step runs under the torch
profiler with memory tracking, whose allocation events give the allocator's peak above the step's start.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from .common import (
    MODELS,
    Settings,
    bitfit_missing,
    fmt_bytes,
    loss_of,
    make_batch,
    make_variant,
    rss_bytes,
    target,
    tensor_bytes,
    train_step_fn,
    trainable,
    trim_heap,
)

KINDS = ("bitfit", "full", "lora")


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status; peak RSS needs Linux.")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not permitted: the peak then covers the whole process life
        return False


def _allocator_peak(step: Any) -> int:
    """Peak of the running sum of allocations (self memory of every op, in time order) during one `step()`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


SAVED_KINDS = ("attention", "MLP", "norms", "logits + loss", "LoRA branch", "embeddings", "other")


def _module_kinds(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> the kind its saved tensors count as; modules not listed inherit their parent's kind."""
    kinds: dict[int, str] = {}
    for module in model.modules():
        name = type(module).__name__
        if hasattr(module, "lm_head"):  # the causal LM itself: its own ops are the loss
            kinds[id(module)] = "logits + loss"
            kinds[id(module.lm_head)] = "logits + loss"
        elif name.endswith("Attention"):
            kinds[id(module)] = "attention"
        elif name.endswith("MLP"):
            kinds[id(module)] = "MLP"
        elif "Norm" in name:
            kinds[id(module)] = "norms"
        elif isinstance(module, torch.nn.Embedding):
            kinds[id(module)] = "embeddings"
        for branch in ("lora_A", "lora_B"):  # peft LoRA layers: their adapters' own inputs
            for sub in (
                getattr(module, branch, {}).values()
                if isinstance(getattr(module, branch, None), torch.nn.ModuleDict)
                else ()
            ):
                kinds[id(sub)] = "LoRA branch"
    return kinds


def _saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes autograd keeps for the backward pass, by kind of module that saved them: distinct storages saved by one
    forward and still held when it returns (a custom Function may run autograd inside its forward and free what that
    saved), each counted once, for the first module that saved it. Storages of the model's own parameters and buffers
    are left out: a frozen weight saved for `dx = dy W` is a reference to memory the model holds anyway."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kinds = _module_kinds(model)
    stack: list[str] = []
    seen: dict[int, tuple[str, int, list[weakref.ref[torch.Tensor]]]] = {}

    def enter(module: torch.nn.Module, *_: Any) -> None:
        # A module without a kind inherits its parent's, except under the causal LM itself, whose own ops are the loss
        # but whose decoder (residual adds, the layer inputs checkpointing keeps) is "other".
        parent = stack[-1] if stack and stack[-1] != "logits + loss" else "other"
        stack.append(kinds.get(id(module), parent))

    def leave(module: torch.nn.Module, *_: Any) -> None:
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if t.device.type != "cpu" or ptr in own:
            return t
        entry = seen.get(ptr)
        if entry is None or not any(r() is not None for r in entry[2]):  # new, or a freed storage's address reused
            seen[ptr] = entry = (stack[-1] if stack else "other", t.untyped_storage().nbytes(), [])
        entry[2].append(weakref.ref(t))
        return t

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(model, batch)
        gc.collect()
        out = dict.fromkeys(SAVED_KINDS, 0)
        for kind, nbytes, refs in seen.values():
            if any(r() is not None for r in refs):
                out[kind] += nbytes
        del loss
    finally:
        for h in hooks:
            h.remove()
    return out


# The decoder table (SmolLM2-135M-Instruct): label -> (make_variant kind, its kwargs).
DECODER_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bitfit b_q+b_m2": ("bitfit", {"bias_terms": ["query", "intermediate"], "add_missing_bias": True}),
    "bitfit all biases": ("bitfit", {"add_missing_bias": True}),
    "lora r=8 q,v": ("lora", {}),
    "full": ("full", {}),
    "bitfit b_q+b_m2, lean": (
        "bitfit",
        {"bias_terms": ["query", "intermediate"], "add_missing_bias": True, "lean": True},
    ),
    "lora r=8 q,v, lean": ("lora", {"lean": True}),
}


def probe(
    model_name: str,
    batch: int,
    seq: int,
    kind: str,
    quick: bool,
    threads: int,
    checkpointing: bool = False,
    variant_kw: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs in a fresh process: memory figures of training `kind` on `model_name` at batch x seq."""
    torch.set_num_threads(threads)
    settings = Settings.for_mode(quick)
    base = MODELS[model_name](settings)
    kw = dict(variant_kw or {})
    lean = kw.pop("lean", False)
    model = make_variant(kind, model_name, base, **kw)
    if lean:  # bitfit_peft.lean: chunked loss without the logits, gated MLP without silu(gate)
        from bitfit_peft.lean import enable_lean_training

        enable_lean_training(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    del base
    gc.collect()
    trim_heap()
    data = make_batch(model, batch, seq)
    rss_built = rss_bytes()
    step = train_step_fn(model, data)
    step()
    reset = _reset_peak_rss()
    step()
    peak = _peak_rss_since_reset()
    opt = step.optimizer  # type: ignore[attr-defined]
    params = trainable(model)
    out = {
        "rss_after_build": rss_built,
        "peak_rss_step": peak,
        "peak_rss_over_build": peak - rss_built,
        "peak_reset_worked": reset,
        "model_bytes": tensor_bytes(model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_state_bytes": tensor_bytes(
            v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
        ),
        "saved_by_kind": (saved := _saved_activation_bytes(model, data)),
        "saved_activation_bytes": sum(saved.values()),
        "allocator_peak_step": _allocator_peak(step),
    }
    return out


def run(settings: Settings) -> dict[str, Any]:
    missing = bitfit_missing()
    plan = [("bert-base", *settings.batches[0])]
    if not settings.quick:
        plan.append(("minilm", *settings.batches[1]))
    plan = [p for p in plan if settings.keeps(p[0])]
    rows, data, skipped = [], [], {}
    ctx = multiprocessing.get_context("spawn")
    # Full mode: a fresh process per probe. Quick mode shares one worker (the peak-RSS reset keeps probes apart) so
    # CI does not pay the torch import eight times.
    shared = ProcessPoolExecutor(max_workers=1, mp_context=ctx) if settings.quick else None
    for model_name, batch, seq in plan:
        for kind in KINDS if not settings.quick else KINDS[:2]:
            if kind == "bitfit" and missing:
                skipped[f"{model_name} bitfit"] = missing
                continue
            pool = shared or ProcessPoolExecutor(max_workers=1, mp_context=ctx)
            try:
                fig = pool.submit(
                    probe, model_name, batch, seq, kind, settings.quick, torch.get_num_threads()
                ).result()
            finally:
                if pool is not shared:
                    pool.shutdown()
            fig.update(model=model_name, batch=batch, seq=seq, variant=kind)
            data.append(fig)
            rows.append([
                f"{model_name} {batch}×{seq}", kind, f"{fig['trainable_params']:,}", fmt_bytes(fig["rss_after_build"]),
                fmt_bytes(fig["peak_rss_step"]), fmt_bytes(fig["peak_rss_over_build"]),
                fmt_bytes(fig["allocator_peak_step"]), fmt_bytes(fig["grad_bytes"]),
                fmt_bytes(fig["optimizer_state_bytes"]), fmt_bytes(fig["saved_activation_bytes"]),
            ])  # fmt: skip
    if shared is not None:
        shared.shutdown()
    decoder = _decoder_table(settings, ctx) if settings.keeps("smollm2") else None
    columns = [
        "model", "variant", "trainable", "RSS built", "peak RSS (step)", "peak − built", "allocator peak",
        "grads", "AdamW state", "saved activations",
    ]  # fmt: skip
    return {
        "title": "Peak training memory and optimizer state",
        "probes": data,
        "skipped": skipped,
        "tables": [{"title": "One training step per fresh process", "columns": columns, "rows": rows}]
        + (decoder["tables"] if decoder else []),
        "decoder_probes": decoder["probes"] if decoder else [],
        "targets": decoder["targets"] if decoder else [],
        "notes": [
            "peak − built = the step's own RSS cost (activations, gradients, optimizer state, allocator slack).",
            "allocator peak = highest running total of torch CPU allocations during one steady-state step "
            "(profiler memory events, op granularity); optimizer state is allocated in the warm-up step, not here.",
            "BERT-base is probed at 8×128 and the real MiniLM at 32×128 (a BERT-base 32×128 step takes tens of "
            "seconds on a shared 2-core CPU).",
        ],
    }


def _decoder_table(settings: Settings, ctx: Any) -> dict[str, Any]:
    """SmolLM2-135M-Instruct: each variant, with and without checkpointing, at two sequence lengths, in a fresh
    process. Saved-for-backward bytes are exact and stable run to run; RSS and the allocator peak are beside them."""
    batch, seqs = (2, (16,)) if settings.quick else (2, (128, 256))
    probes, rows = [], []
    # Quick mode (CI) shares one worker, as the encoder table does; full mode spawns a fresh process per probe.
    shared = ProcessPoolExecutor(max_workers=1, mp_context=ctx) if settings.quick else None
    for seq in seqs:
        for checkpointing in (False, True):
            group = {}
            for label, (kind, kw) in DECODER_VARIANTS.items():
                pool = shared or ProcessPoolExecutor(max_workers=1, mp_context=ctx)
                args = ("smollm2", batch, seq, kind, settings.quick, torch.get_num_threads(), checkpointing, kw)
                try:
                    fig = pool.submit(probe, *args).result()
                finally:
                    if pool is not shared:
                        pool.shutdown()
                fig.update(model="smollm2", batch=batch, seq=seq, variant=label, checkpointing=checkpointing)
                probes.append(fig)
                group[label] = fig
            lora = group["lora r=8 q,v"]["saved_activation_bytes"]
            for label, fig in group.items():
                rows.append([
                    f"{batch}×{seq}", "on" if checkpointing else "off", label, f"{fig['trainable_params']:,}",
                    fmt_bytes(fig["saved_activation_bytes"]), f"{fig['saved_activation_bytes'] / lora:.2f}",
                    fmt_bytes(fig["allocator_peak_step"]), fmt_bytes(fig["peak_rss_over_build"]),
                    fmt_bytes(fig["grad_bytes"]), fmt_bytes(fig["optimizer_state_bytes"]),
                ])  # fmt: skip
    if shared is not None:
        shared.shutdown()
    columns = [
        "batch×seq", "checkpointing", "variant", "trainable", "saved for backward", "× LoRA", "allocator peak",
        "peak RSS − built", "grads", "AdamW state",
    ]  # fmt: skip
    title = "SmolLM2-135M-Instruct: memory of one training step" + (" (quick: tiny Llama)" if settings.quick else "")
    kinds = [k for k in SAVED_KINDS if any(p["saved_by_kind"][k] for p in probes)]
    by_kind = [
        [f"{p['batch']}×{p['seq']}", p["variant"], *(fmt_bytes(p["saved_by_kind"][k]) for k in kinds),
         fmt_bytes(p["saved_activation_bytes"])]
        for p in probes if not p["checkpointing"]
    ]  # fmt: skip
    return {
        "probes": probes,
        "tables": [
            {"title": title, "columns": columns, "rows": rows},
            {
                "title": "Saved for backward by kind of module, checkpointing off"
                + (" (quick)" if settings.quick else ""),
                "columns": ["batch×seq", "variant", *kinds, "total"],
                "rows": by_kind,
            },
        ],
        "targets": _decoder_targets(probes),
    }


def _decoder_targets(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's goals on saved-for-backward bytes: BitFit <= LoRA r=8 everywhere, <= 0.8x without checkpointing."""
    lora = {
        (p["seq"], p["checkpointing"]): p["saved_activation_bytes"] for p in probes if p["variant"] == "lora r=8 q,v"
    }
    out = []
    for p in probes:
        if not p["variant"].startswith("bitfit"):
            continue
        where = (p["seq"], p["checkpointing"])
        r = p["saved_activation_bytes"] / lora[where]
        ratio = {"median": r, "min": r, "max": r}
        ck = "on" if p["checkpointing"] else "off"
        name = f"{p['variant']} saved / LoRA r=8 q,v, {p['batch']}×{p['seq']}, checkpointing {ck}"
        why = "the bias op keeps nothing; the frozen path both keep dominates (see the lean row)"
        out.append(target(name, ratio, 1.0 if p["checkpointing"] else 0.8, why))
    return out


def saved_only(
    seqs: tuple[int, ...], checkpointing: tuple[bool, ...] = (False, True), batch: int = 2, quick: bool = False
) -> list[dict[str, Any]]:
    """The decoder table's saved-for-backward bytes alone (one forward per row, no training step), in this process:
    the exact, stable column of the table in minutes where the full table takes an hour on a busy 2-core machine."""
    settings = Settings.for_mode(quick)
    base = MODELS["smollm2"](settings)
    out = []
    for seq in seqs:
        for ck in checkpointing:
            for label, (kind, kw) in DECODER_VARIANTS.items():
                kw = dict(kw)
                lean = kw.pop("lean", False)
                model = make_variant(kind, "smollm2", base, **kw)
                if lean:
                    from bitfit_peft.lean import enable_lean_training

                    enable_lean_training(model)
                if ck:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                saved = _saved_activation_bytes(model.train(), make_batch(model, batch, seq))
                out.append({
                    "variant": label, "batch": batch, "seq": seq, "checkpointing": ck,
                    "saved_by_kind": saved, "saved_activation_bytes": sum(saved.values()),
                })  # fmt: skip
                print(json.dumps(out[-1]), flush=True)
                del model
                gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.case_memory`: the decoder table's rows one at a time, each printed as a JSON line as it
    finishes (a run cut short keeps what it measured). `--saved-only`: saved-for-backward bytes only, one process."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.case_memory", description=main.__doc__)
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 256], help="sequence lengths (batch 2)")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--variants", nargs="+", default=list(DECODER_VARIANTS), choices=list(DECODER_VARIANTS))
    parser.add_argument("--saved-only", action="store_true", help="saved-for-backward bytes only (minutes)")
    parser.add_argument("--quick", action="store_true", help="the tiny Llama instead of SmolLM2")
    args = parser.parse_args(argv)
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    if args.saved_only:
        saved_only(tuple(args.seqs), modes, quick=args.quick)
        return
    ctx = multiprocessing.get_context("spawn")
    for seq in args.seqs:
        for checkpointing in modes:
            for label in args.variants:
                kind, kw = DECODER_VARIANTS[label]
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    a = ("smollm2", 2, seq, kind, args.quick, torch.get_num_threads(), checkpointing, kw)
                    fig = pool.submit(probe, *a).result()
                fig.update(variant=label, batch=2, seq=seq, checkpointing=checkpointing)
                print(json.dumps(fig), flush=True)


if __name__ == "__main__":
    main()
