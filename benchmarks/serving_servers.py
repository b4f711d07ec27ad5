"""The server processes of the serving case (`case_serving`): what each variant serves, and how the case starts them.

`python -m benchmarks.serving_servers --base B --adapters DIR [--lora N]` runs uvicorn on 127.0.0.1 with ephemeral
ports and prints `SERVING {"ports": {variant: port}, "load_s": ...}` once every app is up: the `TaskStore` app (a) and,
over the same store, the grouped-by-task app (b); or, with `--lora N`, the peft LoRA app (c). `Server` starts one
such process from the case and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH, MAX_WAIT_MS = 32, 5.0


class GroupedStore:
    """A `TaskStore` whose `predict_outcomes` runs one call per task of the batch (variant b); all else is the store's."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def predict_outcomes(self, items: Sequence[tuple[Any, ...]], batch_size: int = 64) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for i, (task, *_) in enumerate(items):
            groups.setdefault(task, []).append(i)
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            outcomes = self._store.predict_outcomes([items[i] for i in idx], batch_size)
            for i, outcome in zip(idx, outcomes, strict=True):
                out[i] = outcome
        return out


class LoraStore:
    """peft LoRA r=8 on query/value with `n` adapters (each with its own head), served like a `TaskStore`.

    `predict` runs one `peft_model(**batch, adapter_names=...)` forward per call. The head is the mean-pooling head's
    Linear, saved per adapter (`modules_to_save`), since peft mixes batches only through Linear-like wrappers.
    """

    kind = "classifier"
    refused: dict[str, str] = {}

    def __init__(self, base: str, n: int, max_length: int = 128, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        from bitfit_peft import MeanPooledSequenceClassifier
        from bitfit_peft.serving import TaskInfo

        def config() -> LoraConfig:
            return LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier.out_proj"],
                              init_lora_weights=False)  # fmt: skip

        torch.manual_seed(0)
        self.base_name, self.max_length = base, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = get_peft_model(
            MeanPooledSequenceClassifier.from_pretrained(base, num_labels=2), config(), "t0000"
        )
        for i in range(1, n):
            self.model.add_adapter(f"t{i:04d}", config())
        self.model.to(device, getattr(torch, dtype)).eval()
        self.device = device
        self._info = {name: TaskInfo(name, "single_label_classification", ["neg", "pos"], None, 0, 0, "", time.time())
                      for name in self.model.peft_config}  # fmt: skip

    def tasks(self) -> list[Any]:
        return [self._info[n] for n in sorted(self._info)]

    def task(self, name: str) -> Any:
        from bitfit_peft.serving import UnknownTaskError

        if name not in self._info:
            raise UnknownTaskError(name, sorted(self._info))
        return self._info[name]

    def predict_outcomes(self, items: Sequence[tuple[Any, ...]], batch_size: int = 64) -> list[Any]:
        """One peft forward with `adapter_names` for the batch (the server's batcher calls this)."""
        import torch

        from bitfit_peft.serving import TaskStore

        texts = [inputs if isinstance(inputs, str) else inputs[0] for _, inputs, *_ in items]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch, adapter_names=[task for task, *_ in items]).logits.float()
        return [TaskStore._prediction(self._info[task], row) for (task, *_), row in zip(items, logits, strict=True)]


async def _serve(args: argparse.Namespace) -> None:
    import torch

    from bitfit_peft.serving import TaskStore
    from bitfit_peft.serving.server import ServeSettings, create_app

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = ServeSettings(base=args.base, adapters=args.adapters, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_queue=4096, device=args.device, dtype=args.dtype)  # fmt: skip
    if args.lora:
        lora = LoraStore(args.base, args.lora, device=args.device, dtype=args.dtype)
        apps = {"c": create_app(settings, lora)}  # type: ignore[arg-type]
    else:
        store = TaskStore.open(args.base, args.adapters, device=args.device, dtype=args.dtype)
        if store.refused:
            raise SystemExit(f"adapters refused: {dict(list(store.refused.items())[:3])}")
        apps = {"a": create_app(settings, store), "b": create_app(settings, GroupedStore(store))}  # type: ignore[arg-type]
    load_s = time.perf_counter() - started
    await serve_apps(apps, load_s)


async def serve_apps(apps: dict[str, Any], load_s: float) -> None:
    """Run each app under uvicorn on 127.0.0.1 (an ephemeral port each), print `SERVING {"ports": ..., "load_s": ...}`
    once all are up (what `Server.wait_ready` reads), then serve until stopped."""
    import uvicorn

    servers = {v: uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
               for v, app in apps.items()}  # fmt: skip
    running = [asyncio.create_task(s.serve()) for s in servers.values()]
    while not all(s.started for s in servers.values()):
        if any(t.done() for t in running):
            raise SystemExit("a server failed to start (see the log above)")
        await asyncio.sleep(0.05)
    ports = {v: s.servers[0].sockets[0].getsockname()[1] for v, s in servers.items()}
    print("SERVING " + json.dumps({"ports": ports, "load_s": load_s}), flush=True)
    await asyncio.gather(*running)


class Server:
    """A `serve` subprocess; `ports` maps its variants to their ports once it is up."""

    def __init__(self, base: str, adapters: str, log: str, lora: int = 0, threads: int = 1, device: str = "cpu",
                 dtype: str = "float32") -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "benchmarks.serving_servers", "--base", base, "--adapters", adapters,
               "--threads", str(threads), "--max-batch-size", str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS),
               "--device", device, "--dtype", dtype]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd + (["--lora", str(lora)] if lora else []), cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        self.ports: dict[str, int] = {}
        self.load_s = 0.0

    def wait_ready(self, timeout: float = 600.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            line = self.proc.stdout.readline() if ready else ""
            if line.startswith("SERVING "):
                info = json.loads(line[len("SERVING ") :])
                self.ports, self.load_s = info["ports"], info["load_s"]
                return
            if self.proc.poll() is not None:
                break
        self.stop()
        tail = Path(self.log).read_text()[-2000:]
        raise RuntimeError(f"the benchmark server did not start within {timeout:.0f} s; its log ends:\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--lora", type=int, default=0, help="serve peft LoRA with this many adapters instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH)
    parser.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS)
    parser.add_argument("--device", default="cpu", help="torch device of the served model (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    asyncio.run(_serve(parser.parse_args()))
