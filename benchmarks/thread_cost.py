"""Does torch run slower in a worker thread than in the main thread? The same greedy `generate` of SmolLM2 (or any
causal LM checkpoint) in the main thread and in a fresh `threading.Thread`, interleaved (A B B A ...), median of
rounds, with wall seconds, the calling thread's CPU seconds and the whole process's CPU seconds (a process/thread CPU
ratio near 1 means the op ran on one core; near 2, on two).

    python -m benchmarks.thread_cost --base ~/.cache/bitfit-peft-bench/smollm2-135m-instruct --threads 2 --rounds 6

`--set-in-worker` calls `torch.set_num_threads` inside the worker too. Prints one JSON line per thread.

`--ops` times single torch ops instead (no model): a float32 `linear` of 1 and 8 rows through a 1536 x 576 weight
and `exp` of 4M floats, 200 calls each, per thread, with the process CPU / wall ratio (about 2 means the op ran on
two cores, about 1 on one):

    python -m benchmarks.thread_cost --ops --threads 2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

import torch
import transformers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="causal LM checkpoint (not needed with --ops)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--set-in-worker", action="store_true")
    p.add_argument("--ops", action="store_true", help="time single ops (linear, exp) instead of a generate")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ops:
        return ops(args.threads, args.rounds, args.set_in_worker)
    tok = transformers.AutoTokenizer.from_pretrained(args.base)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.base).eval()
    enc = tok(["Write a short poem about the sea."], return_tensors="pt")

    def timed() -> tuple[float, float, float, int]:
        start, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        return time.perf_counter() - start, time.thread_time() - cpu, time.process_time() - proc, torch.get_num_threads()  # fmt: skip

    def in_worker() -> tuple[float, float, float, int]:
        box: list[tuple[float, float, float, int]] = []

        def body() -> None:
            if args.set_in_worker:
                torch.set_num_threads(args.threads)
            box.append(timed())

        worker = threading.Thread(target=body)
        worker.start()
        worker.join()
        return box[0]

    runs: dict[str, Callable[[], tuple[float, float, float, int]]] = {"main": timed, "worker": in_worker}
    for fn in runs.values():
        fn()  # warm-up
    res: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            res[name].append(runs[name]())
    for name, xs in res.items():
        print(json.dumps({"thread": name, "torch_threads": sorted({x[3] for x in xs}), "wall_s": round(statistics.median(x[0] for x in xs), 3), "thread_cpu_s": round(statistics.median(x[1] for x in xs), 3), "process_cpu_s": round(statistics.median(x[2] for x in xs), 3), "walls": [round(x[0], 2) for x in xs], "set_in_worker": args.set_in_worker}), flush=True)  # fmt: skip


def ops(threads: int, rounds: int, set_in_worker: bool) -> None:
    """Each op in the main thread and in a fresh worker thread, interleaved; median wall and CPU/wall per op."""
    weight, one, eight, big = torch.randn(1536, 576), torch.randn(1, 576), torch.randn(8, 576), torch.randn(4_000_000)
    cases: dict[str, Callable[[], object]] = {
        "linear 1 row": lambda: torch.nn.functional.linear(one, weight),
        "linear 8 rows": lambda: torch.nn.functional.linear(eight, weight),
        "exp 4M": lambda: torch.exp(big),
    }

    def timed(op: Callable[[], object]) -> tuple[float, float]:
        for _ in range(5):
            op()
        start, proc = time.perf_counter(), time.process_time()
        for _ in range(200):
            op()
        wall = time.perf_counter() - start
        return wall, (time.process_time() - proc) / wall

    def in_worker(op: Callable[[], object]) -> tuple[float, float]:
        box: list[tuple[float, float]] = []

        def body() -> None:
            if set_in_worker:
                torch.set_num_threads(threads)
            box.append(timed(op))

        worker = threading.Thread(target=body)
        worker.start()
        worker.join()
        return box[0]

    for name, op in cases.items():
        res: dict[str, list[tuple[float, float]]] = {"main": [], "worker": []}
        for r in range(rounds):
            for where in ("main", "worker") if r % 2 == 0 else ("worker", "main"):
                res[where].append(timed(op) if where == "main" else in_worker(op))
        for where, xs in res.items():
            print(json.dumps({"op": name, "thread": where, "torch_threads": threads, "wall_s": round(statistics.median(x[0] for x in xs), 4), "cpu_per_wall": round(statistics.median(x[1] for x in xs), 2), "set_in_worker": set_in_worker}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
