"""Profile the generation engine's steps against `PeftModel.generate` offline, both in the main thread.

    python -m benchmarks.engine_profile --rows 8 --tokens 32 --mode cprofile

SmolLM2-135M-Instruct from `~/.cache/bitfit-peft-bench` (`--base`), 2 random BitFit tasks, 1 torch thread. The
engine's steps run in the calling thread (no engine thread), so cProfile and torch.profiler see them. `--mode time`
prints both methods' seconds over 3 interleaved repeats; `cprofile` the top 25 functions by own time; `torch` the
top 25 torch ops by self CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from peft import PeftModel

from bitfit_peft.serving import TaskStore
from bitfit_peft.serving.engine import GenerationEngine, SamplingParams
from bitfit_peft.serving.handle import GenerationHandle
from bitfit_peft.serving.kv import SlotCache

from .engine_cost import PROMPTS, adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(Path("~/.cache/bitfit-peft-bench/smollm2-135m-instruct").expanduser()))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--mode", choices=("time", "cprofile", "torch"), default="cprofile")
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    adapters(args.base, Path(tmp), 2)
    store = TaskStore.open(args.base, tmp, max_length=512)
    engine = GenerationEngine(store)
    param = next(store.model.parameters())
    engine._cache = SlotCache(engine.max_tokens_in_flight, *engine._shape, dtype=param.dtype, device=param.device)
    tok = store.tokenizer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
    tasks = [f"task{i % 2}" for i in range(args.rows)]

    def run_engine() -> None:
        params = SamplingParams(max_tokens=args.tokens, temperature=0)
        for task, prompt in zip(tasks, prompts, strict=True):
            engine._admit(task, prompt, params, GenerationHandle(lambda h: None), time.perf_counter())
        while engine._running or engine._waiting:
            while engine._waiting and len(engine._running) < engine.max_running:
                engine._running.append(engine._waiting.popleft())
            engine._step()

    peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(args.base), f"{tmp}/task0")
    peft = peft.eval()
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run_offline() -> None:
        with torch.inference_mode():
            peft.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip

    runs: dict[str, Callable[[], None]] = {"engine": run_engine, "offline": run_offline}
    for fn in runs.values():
        fn()  # warm-up
    if args.mode == "time":
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            print(name, [round(t, 3) for t in ts], "median", round(statistics.median(ts), 3))
        return
    for name, fn in runs.items():
        print("=====", name)
        if args.mode == "cprofile":
            prof = cProfile.Profile()
            prof.enable()
            fn()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
                fn()
            print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
