"""What the HTTP routes share: `ServeSettings` and the per-app `Service` (store, batcher, generation engine,
metrics), reached by the routes through the `Svc` dependency.

The service owns the engine's lifetime (`start` / `close`, run by the app's lifespan) and the two things every
route needs: `run` (queue items on the batcher and await them, off the event loop) and `resolve_adapter_path` (the
admin routes' path check). It raises `serving.errors` types only; the app maps them to status codes in one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from .batcher import Batcher
from .chunks import check_forward_cost
from .errors import ForbiddenPathError, MissingAdapterError, ServingError, StartingError, TimedOutError
from .metrics import ServerMetrics
from .store import TaskStore

__all__ = ["ServeSettings", "Service", "Svc", "service"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Everything the server needs; the CLI flags of `bitfit-peft serve` map one to one onto these fields.

    Args:
        base: the base model (local directory or hub id).
        adapters: the directory of adapters (`<adapters>/<task>/`); admin loads must stay inside it.
        host, port: where uvicorn listens (the CLI uses them; `create_app` does not).
        max_batch_size: most items per micro-batch.
        max_wait_ms: how long a micro-batch waits for more items after its first one.
        max_queue: most items waiting at once; beyond it requests get 429 with `Retry-After`.
        max_length: longest input in tokens; longer ones get 413 unless the request asks `"truncate": true`.
        max_items_per_request: most items in one mixed request (413 beyond).
        max_new_tokens: the largest `max_tokens` (`max_new_tokens`) a generation request may ask for.
        max_tokens_in_flight: generation's KV budget: prompt + `max_tokens` of every running request, summed;
            a request that does not fit gets 429 with `Retry-After`.
        max_running: most generation requests decoding at once (rows of the running batch).
        prefill_chunk: prompt tokens prefilled per engine step, so a long prompt does not stall running decodes.
        dtype, device: how the store loads the base model.
        forward_cost_tokens: what one more forward costs in padded tokens: each micro-batch is sorted by length
            and cut where padding would cost more (`TaskStore.open`); None: 32 on CPU, one forward elsewhere.
        threads: torch intra-op threads (set by the CLI; None leaves torch's default).
        api_key: if set, admin routes need `Authorization: Bearer <api_key>`.
        request_timeout_s: a request still waiting for its result after this gets 504.
        retry_after_s: the `Retry-After` value of 429 and 503 answers.
        metrics_max_tasks: tasks with their own `task` label in /metrics (the rest are `other`).
        drain_timeout_s: at shutdown, how long to wait for queued items to finish.
    """

    base: str
    adapters: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_length: int = 128
    max_items_per_request: int = 256
    max_new_tokens: int = 256
    max_tokens_in_flight: int = 16384
    max_running: int = 64
    prefill_chunk: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    forward_cost_tokens: float | None = None
    threads: int | None = None
    api_key: str | None = None
    request_timeout_s: float = 60.0
    retry_after_s: int = 1
    metrics_max_tasks: int = 64
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_length", "max_items_per_request", "max_new_tokens",
                     "max_tokens_in_flight", "max_running", "prefill_chunk"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError(
                f"max_wait_ms must be >= 0 and request_timeout_s > 0, got {self.max_wait_ms} and {self.request_timeout_s}."
            )
        if self.forward_cost_tokens is not None:
            check_forward_cost(self.forward_cost_tokens, "forward_cost_tokens")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty: pass a non-empty key, or None to leave the admin routes open.")


class Service:
    """The app's engine and shared parts (see the module docstring).

    Args:
        settings: the server settings.
        store: a `TaskStore` to serve; None opens one from `settings` at startup.
        kind: `"classifier"` or `"generator"`, which decides the routes; default: the store's, or read from the
            adapters' configs (`TaskStore.kind_of`).
    """

    def __init__(self, settings: ServeSettings, store: TaskStore | None, kind: str | None = None) -> None:
        self.settings = settings
        self.store: Any = store
        self.kind = kind or (store.kind if store is not None else TaskStore.kind_of(settings.base, settings.adapters))
        self.metrics = ServerMetrics(settings.metrics_max_tasks)
        self.batcher: Batcher | None = None
        self.engine: Any = None  # serving.engine.GenerationEngine for a generator base
        self.admin_lock = asyncio.Lock()
        self.adapters_root = os.path.realpath(settings.adapters)

    async def start(self) -> None:
        """Open the store (in a thread) if none was given, and start the batcher or the generation engine."""
        s = self.settings
        if self.store is None:
            self.store = await asyncio.to_thread(
                TaskStore.open, base=s.base, adapters=s.adapters, dtype=s.dtype, device=s.device,
                max_length=s.max_length, forward_cost_tokens=s.forward_cost_tokens,
            )  # fmt: skip
        for name, reason in getattr(self.store, "refused", {}).items():
            logger.warning("adapter %r is not served: %s", name, reason)
        self.metrics.resident.set(len(self.store.tasks()))
        if self.kind == "generator":
            from .engine import GenerationEngine

            self.engine = GenerationEngine(
                self.store, max_tokens_in_flight=s.max_tokens_in_flight, max_running=s.max_running,
                prefill_chunk=s.prefill_chunk, max_prompt_tokens=s.max_length, observer=self.metrics,
            )  # fmt: skip
            self.engine.start()
            return
        batcher = Batcher(self.store, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                          max_queue=s.max_queue, observer=self.metrics)  # fmt: skip
        batcher.start()
        self.batcher = batcher

    async def close(self) -> None:
        """Finish whatever is queued or running (up to `drain_timeout_s`), then stop the worker thread."""
        for worker in (self.batcher, self.engine):
            if worker is not None:
                await asyncio.to_thread(worker.close, self.settings.drain_timeout_s)

    @property
    def worker(self) -> Any:
        """The batcher or the generation engine, whichever this base runs."""
        return self.engine if self.kind == "generator" else self.batcher

    async def run(self, works: Sequence[Any]) -> list[Any]:
        """Queue prediction items on the batcher and await their results (the model runs on its thread). An item's
        error is raised, marked with the item's index when there are several."""
        if self.batcher is None:
            raise StartingError("The server is starting: retry shortly.")
        futures = self.batcher.submit(works)
        waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        try:
            results = await asyncio.wait_for(waiting, self.settings.request_timeout_s)
        except TimeoutError:
            raise TimedOutError(f"No result within {self.settings.request_timeout_s} s: retry, or raise --request-timeout.") from None  # fmt: skip
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                if len(works) > 1 and isinstance(result, ServingError):
                    result.args = (f"{result.message} (items[{i}])",)  # a ServingError holds its message alone
                raise result
        return list(results)

    def resolve_adapter_path(self, path: str) -> str:
        """The real directory of an admin path: inside the adapters directory (after symlinks), and existing."""
        root = self.adapters_root
        if "\x00" in path:
            raise ForbiddenPathError(f"Adapter path {path!r} holds a NUL character: send a directory name.")
        real = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces `root` in the join
        if real == root or os.path.commonpath([real, root]) != root:
            raise ForbiddenPathError(f"Adapter path {path!r} is outside the adapters directory {root}: put the adapter in a folder inside it.")  # fmt: skip
        if not os.path.isdir(real):
            raise MissingAdapterError(f"No adapter directory at {path!r} inside {root}: save the adapter there first.")  # fmt: skip
        return real


def service(request: Request) -> Service:
    """The app's `Service` (a FastAPI dependency)."""
    return request.app.state.service  # type: ignore[no-any-return]


Svc = Annotated[Service, Depends(service)]
