"""The server processes of the generation case (`case_generate`): what each variant serves, and how the case starts them.

`python -m benchmarks.generate_servers --base B --adapters DIR` runs uvicorn on 127.0.0.1 with ephemeral ports and
prints `SERVING {"ports": {variant: port}, "load_s": ...}` once both apps are up, over one `TaskStore`:

- `ours`: `bitfit-peft serve`'s app (`create_app`): OpenAI `/v1/completions` with streaming over the continuous-
  batching `GenerationEngine` (requests join and leave the running decode batch at step boundaries).
- `static`: today's static path in a small app of this module: the same store behind the old `Batcher`, whose worker
  runs one mixed `TaskStore.generate` (one `model.generate`) per micro-batch. Its `/v1/completions` answers once the
  whole batch is done, as one text chunk (its time to first token is its latency); its token count is the text
  re-tokenized (the static path returns text only).

`TransformersServe` starts the anchor, `transformers serve <base> --continuous-batching` (paged attention, no
adapters), on a free 127.0.0.1 port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .serving_servers import ROOT, Server, serve_apps

STATIC_MAX_BATCH, STATIC_MAX_WAIT_MS = 64, 5.0
# `transformers serve`'s paged KV cache: the same token budget as ours (`ServeSettings.max_tokens_in_flight`). Left to
# its default on a CPU it sizes the cache from the machine's RAM (14 GB of a 24 GB box, a minute to allocate).
KV_TOKENS, KV_BLOCK = 16384, 32


def static_app(store: Any, max_batch_size: int = STATIC_MAX_BATCH, max_wait_ms: float = STATIC_MAX_WAIT_MS) -> Any:
    """A FastAPI app serving `/v1/completions` (greedy; `model` = task) through the `Batcher` + `TaskStore.generate`."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from bitfit_peft.serving.batcher import Batcher
    from bitfit_peft.serving.store import GenerationRequest

    batcher = Batcher(store, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=4096)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.aclose(30.0)

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> StreamingResponse:
        request = GenerationRequest(task=body["model"], prompt=body["prompt"], max_new_tokens=int(body["max_tokens"]))
        text = await batcher.generate(request)
        tokens = len(store.tokenizer(text, add_special_tokens=False)["input_ids"])

        async def events() -> AsyncIterator[str]:
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
            last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": {"completion_tokens": tokens}}  # fmt: skip
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _serve(args: argparse.Namespace) -> None:
    import torch

    from bitfit_peft.serving import TaskStore
    from bitfit_peft.serving.server import ServeSettings, create_app

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = ServeSettings(base=args.base, adapters=args.adapters, max_queue=4096, max_new_tokens=512,
                             max_length=512, max_tokens_in_flight=KV_TOKENS, request_timeout_s=600.0, device=args.device, dtype=args.dtype)  # fmt: skip
    store = TaskStore.open(args.base, args.adapters, device=args.device, dtype=args.dtype, max_length=512)
    if store.refused:
        raise SystemExit(f"adapters refused: {dict(list(store.refused.items())[:3])}")
    apps = {"ours": create_app(settings, store)}
    if hasattr(store, "generate"):  # the static path (gone once the engine replaces it: then only `ours` runs)
        apps["static"] = static_app(store)
    load_s = time.perf_counter() - started
    await serve_apps(apps, load_s)


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


class GenerationServers(Server):
    """The `ours` + `static` process; `ports` maps its variants to their ports once it is up."""

    def __init__(self, base: str, adapters: str, log: str, threads: int = 1, device: str = "cpu",
                 dtype: str = "float32") -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "benchmarks.generate_servers", "--base", base, "--adapters", adapters,
               "--threads", str(threads), "--device", device, "--dtype", dtype]  # fmt: skip
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(threads), stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        self.ports: dict[str, int] = {}
        self.load_s = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TransformersServe(Server):
    """`transformers serve BASE --continuous-batching` on a free 127.0.0.1 port (the CLI takes no port 0)."""

    def __init__(self, base: str, log: str, threads: int = 1, device: str = "cpu", dtype: str = "float32") -> None:
        port = _free_port()
        cli = (
            "import sys; from transformers.cli.transformers import main; sys.exit(main())"  # no console script needed
        )
        cmd = [sys.executable, "-c", cli, "serve", base, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
               "--device", device, "--dtype", dtype, "--log-level", "warning", "--format", "quiet",
               "--cb-block-size", str(KV_BLOCK), "--cb-num-blocks", str(KV_TOKENS // KV_BLOCK)]  # fmt: skip
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(threads), stdout=err, stderr=subprocess.STDOUT)
        self.ports = {"transformers": port}
        self.load_s = 0.0
        self._started = time.perf_counter()

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.ports['transformers']}/health", timeout=2.0).status_code == 200:
                    self.load_s = time.perf_counter() - self._started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        tail = Path(self.log).read_text()[-2000:]
        raise RuntimeError(f"transformers serve did not start within {timeout:.0f} s; its log ends:\n{tail}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of the served model (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    asyncio.run(_serve(parser.parse_args()))
