"""What continuous batching costs: the generation engine (`serving.engine`, rows of several tasks) against a plain
`model.generate` batch of the same size (the base alone), `PeftModel.generate` with the first task's adapter (the
offline reference of one stream: `--rows 1 --tasks 1`), today's static `TaskStore.generate` and, where it runs,
transformers' own continuous batching (`generate_batch`, the base alone), interleaved, median of repeats.

    python -m benchmarks.engine_cost --base ~/.cache/bitfit-peft-bench/smollm2-135m-instruct --rows 8 --tokens 24

Prints one JSON line per method: generated tokens, seconds (median), the process's CPU seconds (median; with
`--threads 1` the least disturbed by other jobs on a shared machine) and tokens/s, plus each one's ratio to the plain
`generate` batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model

from bitfit_peft import BitFitConfig
from bitfit_peft.serving import GenerationRequest, TaskStore
from bitfit_peft.serving.engine import GenerationEngine, SamplingParams

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "List three uses of copper.",
    "What is the capital of Japan, and why is it famous?",
    "Give me a recipe for pancakes.",
    "Describe the rules of chess briefly.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet.",
]


def adapters(base: str, root: Path, n: int) -> None:
    """`n` random BitFit adapters (b_q and b_m2, as the issue's SFT runs) saved under `root`."""
    for i in range(n):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        cfg = BitFitConfig(task_type="CAUSAL_LM", init_weights=False, add_missing_bias=True, bias_terms=["query", "intermediate"])  # fmt: skip
        get_peft_model(model, cfg).save_pretrained(str(root / f"task{i}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generate-batch", action="store_true", help="also time transformers' generate_batch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapters(args.base, Path(tmp), args.tasks)
        store = TaskStore.open(args.base, tmp, max_length=512)
        peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(args.base), f"{tmp}/task0")
    peft = peft.eval()
    engine = GenerationEngine(store)
    engine.start()
    tok = store.tokenizer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
    tasks = [f"task{i % args.tasks}" for i in range(args.rows)]
    base = transformers.AutoModelForCausalLM.from_pretrained(args.base).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run_engine() -> int:
        params = SamplingParams(max_tokens=args.tokens, temperature=0)
        handles = [engine.submit(t, q, params) for t, q in zip(tasks, prompts, strict=True)]
        return sum(h.result(600).completion_tokens for h in handles)

    def run_static() -> int:
        store.generate([GenerationRequest(t, q, max_new_tokens=args.tokens) for t, q in zip(tasks, prompts, strict=True)])  # fmt: skip
        return args.rows * args.tokens  # (rows stop together: the batch runs max_new_tokens steps)

    def run_generate() -> int:
        with torch.inference_mode():
            base.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        return args.rows * args.tokens

    def run_peft() -> int:
        with torch.inference_mode():
            peft.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        return args.rows * args.tokens

    def run_generate_batch() -> int:
        config = transformers.GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=-1)
        ids = [tok(q)["input_ids"] for q in prompts]
        with torch.inference_mode():
            out = base.generate_batch(ids, generation_config=config)
        return sum(len(o.generated_tokens) for o in out.values())

    methods: dict[str, Callable[[], int]] = {"generate (base, static batch)": run_generate, "PeftModel.generate (task0, static batch)": run_peft, "engine (continuous, mixed tasks)": run_engine, "TaskStore.generate (static, mixed tasks)": run_static}  # fmt: skip
    if args.generate_batch:
        try:
            run_generate_batch()
            methods["transformers generate_batch (base)"] = run_generate_batch
        except Exception as exc:  # report why it does not run here
            print(json.dumps({"method": "transformers generate_batch (base)", "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpus: dict[str, list[float]] = {m: [] for m in methods}  # CPU seconds of the process (all threads)
    counts: dict[str, int] = {}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start, cpu = time.perf_counter(), time.process_time()
            counts[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu)
    engine.close(60)
    ref = counts["generate (base, static batch)"] / statistics.median(times["generate (base, static batch)"])
    for name in methods:
        seconds = statistics.median(times[name])
        rate = counts[name] / seconds
        print(json.dumps({"method": name, "rows": args.rows, "tokens": counts[name], "seconds": round(seconds, 3), "cpu_seconds": round(statistics.median(cpus[name]), 3), "tokens_per_s": round(rate, 1), "vs_generate": round(rate / ref, 2), "threads": args.threads}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
