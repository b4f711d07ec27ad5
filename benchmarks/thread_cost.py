"""Does torch run slower in a worker thread than in the main thread? The same greedy `generate` of SmolLM2 (or any
causal LM checkpoint) in the main thread and in a fresh `threading.Thread`, interleaved (A B B A ...), median of
rounds, with wall seconds, the calling thread's CPU seconds and the whole process's CPU seconds (a process/thread CPU
ratio near 1 means the op ran on one core; near 2, on two).

    python -m benchmarks.thread_cost --base ~/.cache/bitfit-peft-bench/smollm2-135m-instruct --threads 2 --rounds 6

`--set-in-worker` calls `torch.set_num_threads` inside the worker too. Prints one JSON line per thread.
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
    p.add_argument("--base", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--set-in-worker", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
