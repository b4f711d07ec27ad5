"""What a decode step of a few rows costs on a CPU, with `nn.Linear` and with the serving engine's `SkinnyLinear`
(`weight @ x.T` for up to 4 rows, 8 for the head).

    python -m benchmarks.decode_cost --threads 2 --rounds 5
    python -m benchmarks.decode_cost --threads 1 --rounds 5

Two measurements, each interleaved (stock, skinny, stock, ...) and reported as the median of the rounds:
- `ops`: the products alone, over as many distinct weights as SmolLM2-135M's 30 layers hold (60 of 1536 x 576 and
  60 of 576 x 1536, 424 MB, so they stream from memory as in a real step), and over its 49,152 x 576 head.
- `step`: one forward of SmolLM2-135M-Instruct (`--base`, float32, no adapters) for rows of one new token, with
  every `nn.Linear` as it ships and with `serving.model.skinny_linears` applied.

Prints one JSON line per (measurement, rows, variant) with milliseconds and the ratio to stock with one row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bitfit_peft.serving.model import SkinnyLinear, skinny_linears

ROWS = (1, 2, 4, 8, 16)


def _ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of `fn` over `calls` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def _layers(modules: list[nn.Module], x: dict[int, torch.Tensor]) -> None:
    for m in modules:
        m(x[m.in_features])  # type: ignore[index]


def report(kind: str, times: dict[tuple[int, str], list[float]]) -> None:
    one = statistics.median(times[1, "stock"])
    for (rows, variant), xs in times.items():
        ms = statistics.median(xs)
        print(json.dumps({"measure": kind, "rows": rows, "variant": variant, "ms": round(ms, 2), "vs_stock_1_row": round(ms / one, 2)}), flush=True)  # fmt: skip


def ops(rounds: int) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(576, 1536, bias=False) for _ in range(60)] + [
        nn.Linear(1536, 576, bias=False) for _ in range(60)
    ]
    head = nn.Linear(576, 49152, bias=False)
    variants = {
        "stock": (layers, head),
        "skinny": ([SkinnyLinear.of(m, 4) for m in layers], SkinnyLinear.of(head, 8)),
    }
    times: dict[tuple[int, str], list[float]] = {}
    head_times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(rounds):
            for rows in ROWS:
                x = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
                for name in variants if r % 2 == 0 else list(variants)[::-1]:
                    mods, h = variants[name]
                    times.setdefault((rows, name), []).append(_ms(partial(_layers, mods, x), 2))
                    head_times.setdefault((rows, name), []).append(_ms(partial(h, x[576]), 10))
    report("ops: 120 layer weights (424 MB)", times)
    report("ops: the 49,152 x 576 head", head_times)


def step(base: str, rounds: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    stock = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    skinny_linears(model)
    thin = {name: m for name, m in model.named_modules() if isinstance(m, SkinnyLinear)}

    def use(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module)

    variants = {"stock": stock, "skinny": thin}
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(rounds):
            for rows in ROWS:
                ids = torch.randint(0, 1000, (rows, 1))
                for name in variants if r % 2 == 0 else list(variants)[::-1]:
                    use(variants[name])
                    times.setdefault((rows, name), []).append(_ms(partial(model, ids, logits_to_keep=1), 3))
    report("step: SmolLM2-135M forward, one new token a row", times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(Path("~/.cache/bitfit-peft-bench/smollm2-135m-instruct").expanduser()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=["ops", "step"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"threads": args.threads, "rounds": args.rounds}), flush=True)
    if args.only != "step":
        ops(args.rounds)
    if args.only != "ops":
        step(args.base, args.rounds)


if __name__ == "__main__":
    main()
