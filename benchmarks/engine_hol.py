"""Head-of-line inside the generation engine, without HTTP: a 5-token request submitted 0.5 s after a 150-token one,
against the same request alone, with the engine's step times while the short one runs.

    python -m benchmarks.engine_hol --threads 2 --rounds 2

SmolLM2-135M-Instruct from `~/.cache/bitfit-peft-bench` (`--base`), 2 random BitFit tasks (the long request on one,
the short on the other). Prints per round: alone, behind and their ratio, then the steps (rows decoded, prefill
tokens, seconds) from the short request's submission to its end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bitfit_peft.serving import TaskStore
from bitfit_peft.serving.engine import GenerationEngine, SamplingParams

from .case_generate import LONG_PROMPT
from .engine_cost import adapters

SHORT = "Explain photosynthesis to a child."


class Steps:
    """Keeps the engine's step events with their time."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, dict[str, Any]]] = []

    def on_generation(self, event: str, data: dict[str, Any]) -> None:
        if event == "step":
            self.steps.append((time.perf_counter(), data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(Path("~/.cache/bitfit-peft-bench/smollm2-135m-instruct").expanduser()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapters(args.base, Path(tmp), 2)
        store = TaskStore.open(args.base, tmp, max_length=512)
    observer = Steps()
    engine = GenerationEngine(store, observer=observer)
    engine.start()

    def alone() -> float:
        start = time.perf_counter()
        engine.submit("task1", SHORT, SamplingParams(max_tokens=5, temperature=0)).result(600)
        return time.perf_counter() - start

    def behind() -> tuple[float, list[dict[str, Any]]]:
        long = engine.submit("task0", LONG_PROMPT, SamplingParams(max_tokens=150, temperature=0))
        time.sleep(0.5)
        observer.steps.clear()
        start = time.perf_counter()
        engine.submit("task1", SHORT, SamplingParams(max_tokens=5, temperature=0)).result(600)
        seconds = time.perf_counter() - start
        mine = [d for _, d in observer.steps]
        long.result(600)
        return seconds, mine

    try:
        alone()  # warm-up
        for _ in range(args.rounds):
            a = alone()
            b, steps = behind()
            print(f"alone {a:.3f} s, behind {b:.3f} s, ratio {b / a:.2f}", flush=True)
            for step in steps:
                print("   ", {k: round(v, 3) if isinstance(v, float) else v for k, v in step.items()}, flush=True)
    finally:
        engine.close(60)


if __name__ == "__main__":
    main()
