"""What the HTTP server's handlers share: `ServeSettings`, `ApiError`, the per-app `Service` (store, batcher,
metrics, request checks) and the conversions from the store's types to the response schemas."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import Prediction, TaskInfo, UnknownTaskError
from .batcher import Batcher, DrainingError, QueueFullError
from .chunks import check_forward_cost
from .metrics import ServerMetrics
from .schemas import Inputs, PredictResponse, TaskCard

__all__ = ["ApiError", "ServeSettings", "Service", "answer", "card", "known", "plain_errors"]

LISTED_TASKS = 50  # an unknown-task 404 lists at most this many names (GET /v1/models lists them all)


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
        max_new_tokens: the largest `max_new_tokens` a generation request may ask for.
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
        for name in ("max_batch_size", "max_queue", "max_length", "max_items_per_request", "max_new_tokens"):
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


class ApiError(Exception):
    """An HTTP error answered as `ErrorResponse` JSON."""

    def __init__(
        self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers, self.extra = (
            status,
            message,
            error_type,
            headers,
            extra,
        )


class Service:
    """The app's parts, shared by its handlers (set up by the lifespan)."""

    def __init__(self, settings: ServeSettings, store: Any | None) -> None:
        self.settings = settings
        self.store: Any = store
        self.metrics = ServerMetrics(settings.metrics_max_tasks)
        self.batcher: Batcher | None = None
        self.admin_lock = asyncio.Lock()
        self.adapters_root = os.path.realpath(settings.adapters)

    def unknown_task(self, task: str, where: str = "") -> ApiError:
        names = [t.name for t in self.store.tasks()]
        shown = ", ".join(names[:LISTED_TASKS]) + (f", ... ({len(names)} in all)" if len(names) > LISTED_TASKS else "")
        return ApiError(
            404,
            f"Unknown task {task!r}{where}. Loaded tasks: {shown or 'none'}. GET /v1/models lists them.",
            "unknown_task",
            tasks=names[:LISTED_TASKS],
        )

    def check(self, task: str, inputs: Inputs | None, truncate: bool, generate: bool, where: str = "") -> TaskInfo:
        """Everything that can be said about an item before it is queued: its task exists and fits, its length."""
        kind = self.store.kind
        if generate and kind != "generator":
            raise ApiError(400, f"The base {self.store.base_name!r} is a {kind} (an encoder with task heads): it cannot generate. Use POST /v1/predict.", "wrong_route")  # fmt: skip
        if not generate and kind == "generator":
            raise ApiError(400, f"The base {self.store.base_name!r} is a decoder: use POST /v1/generate.", "wrong_route")  # fmt: skip
        try:
            info = self.store.task(task)
        except UnknownTaskError:
            raise self.unknown_task(task, where) from None
        if inputs is not None and not truncate:
            tokens = self.store.count_tokens(inputs)
            if tokens > self.store.max_length:
                raise ApiError(
                    413,
                    f"Input{where} is {tokens} tokens, more than --max-length {self.store.max_length}: shorten it, "
                    'or send "truncate": true to cut it to the first tokens.',
                    "too_long",
                )
        return info

    async def run(self, works: Sequence[Any]) -> list[Any]:
        """Queue the works on the batcher and await them, mapping every failure to an `ApiError`."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.batcher is None:
            raise ApiError(503, "The server is starting: retry shortly.", "unavailable", headers=retry)
        try:
            return await asyncio.wait_for(self.batcher.run(works), self.settings.request_timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), "overloaded", headers=retry) from None
        except DrainingError as exc:
            raise ApiError(503, str(exc), "unavailable", headers=retry) from None
        except TimeoutError:
            raise ApiError(504, f"No result within {self.settings.request_timeout_s} s: retry, or raise --request-timeout.", "timeout") from None  # fmt: skip
        except UnknownTaskError as exc:  # unloaded between the check and its batch
            raise self.unknown_task(getattr(exc, "task", "?")) from None
        except ValueError as exc:
            raise ApiError(422, str(exc), "invalid_input") from None

    def resolve_adapter_path(self, path: str) -> str:
        root = self.adapters_root
        real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if real == root or os.path.commonpath([real, root]) != root:
            raise ApiError(403, f"Adapter path {path!r} is outside the adapters directory {root}: put the adapter in a folder inside it.", "forbidden_path")  # fmt: skip
        if not os.path.isdir(real):
            raise ApiError(404, f"No adapter directory at {path!r} inside {root}: save the adapter there first.", "missing_adapter")  # fmt: skip
        return real


def card(info: TaskInfo) -> TaskCard:
    return TaskCard(
        name=info.name,
        problem=info.problem,
        labels=list(info.labels),
        bias_terms=None if info.bias_terms is None else list(info.bias_terms),
        size_bytes=info.size_bytes,
        params=info.params,
        path=info.path,
        loaded_at=info.loaded_at,
        fingerprint=info.fingerprint,
    )


def answer(p: Prediction) -> PredictResponse:
    return PredictResponse(task=p.task, label=p.label, scores=dict(p.scores), score=p.score, logits=list(p.logits))


def known(svc: Service, task: str) -> bool:
    try:
        svc.store.task(task)
    except UnknownTaskError:
        return False
    return True


def plain_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as JSON-safe dicts (pydantic puts the raw exception object in `ctx`)."""
    return [
        {k: ({n: str(x) for n, x in v.items()} if k == "ctx" else v) for k, v in dict(e).items() if k != "url"}
        for e in errors
    ]
