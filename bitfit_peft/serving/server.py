"""The HTTP server: `create_app(settings)` builds a FastAPI app that serves every task of a `TaskStore`.

Handlers only check a request, queue its items on the app's `Batcher` and await the results; the model runs in the
batcher's worker thread (one mixed forward per micro-batch, across tasks). The routes, and why each is shaped as it
is, are in docs/serving-http.md. The app reads nothing from the environment or from globals: everything comes from
`ServeSettings` (the CLI in `bitfit_peft.serving.cli` builds them and runs uvicorn).

>>> app = create_app(ServeSettings(base="models/minilm", adapters="adapters"))  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import AdapterError, GenerationRequest, Prediction, TaskInfo, TaskStore, UnknownTaskError
from .batcher import Batcher, DrainingError, QueueFullError
from .metrics import MIXED, UNKNOWN, ServerMetrics
from .schemas import (
    AdapterLoadRequest,
    AdapterResponse,
    AdapterUnloadRequest,
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Inputs,
    ModelCard,
    ModelList,
    PredictRequest,
    PredictResponse,
    TaskCard,
)

__all__ = ["ApiError", "ServeSettings", "create_app"]

logger = logging.getLogger(__name__)
# Module level: FastAPI resolves the (postponed) annotations of the handlers in this module's globals.
Credentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The API key, needed by the admin routes when one is set.")),
]
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


class _Service:
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


def _card(info: TaskInfo) -> TaskCard:
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


def _answer(p: Prediction) -> PredictResponse:
    return PredictResponse(task=p.task, label=p.label, scores=dict(p.scores), score=p.score, logits=list(p.logits))


def create_app(settings: ServeSettings, store: TaskStore | None = None) -> FastAPI:
    """The FastAPI app serving `store` (opened from `settings` at startup when not given). See the module doc."""
    svc = _Service(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if svc.store is None:
            svc.store = await asyncio.to_thread(
                TaskStore.open,
                base=settings.base,
                adapters=settings.adapters,
                dtype=settings.dtype,
                device=settings.device,
                max_length=settings.max_length,
            )
        for name, reason in getattr(svc.store, "refused", {}).items():
            logger.warning("adapter %r is not served: %s", name, reason)
        svc.metrics.resident.set(len(svc.store.tasks()))
        batcher = Batcher(
            svc.store,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            observer=svc.metrics,
        )
        batcher.start()
        svc.batcher = batcher
        try:
            yield
        finally:  # uvicorn has finished the requests in flight; now finish whatever is still queued
            await batcher.aclose(settings.drain_timeout_s)

    app = FastAPI(
        title="bitfit-peft serve",
        summary="Many BitFit tasks on one base model, micro-batched across tasks.",
        lifespan=lifespan,
        responses={code: {"model": ErrorResponse} for code in (404, 413, 429, 503)},
    )
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = ErrorResponse(error=exc.message, error_type=exc.error_type, **exc.extra)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "?")
        svc.metrics.requests.labels(route=route, task=UNKNOWN, code="422").inc()
        return JSONResponse({"detail": _plain(exc.errors())}, status_code=422)

    async def admin(credentials: Credentials) -> None:
        key = settings.api_key
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "Admin routes need the server's API key: send `Authorization: Bearer <key>`.", "unauthorized", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def observed(route: str, label: str, coro: Any) -> Any:
        started, code = time.perf_counter(), 500
        try:
            result = await coro
            code = 200
            return result
        except ApiError as exc:
            code = exc.status
            raise
        finally:
            svc.metrics.observe_request(route, label, code, time.perf_counter() - started)

    # -- health ------------------------------------------------------------------------------------------------------
    @app.get("/health", tags=["health"], summary="200 while the model worker runs.")
    async def health() -> JSONResponse:
        ok = svc.batcher is not None and svc.batcher.alive
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/ready", tags=["health"], summary="200 while new requests are taken; 503 while starting or draining.")
    async def ready() -> JSONResponse:
        ok = svc.batcher is not None and svc.batcher.accepting
        return JSONResponse({"status": "ready" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics() -> Response:
        if svc.store is not None:
            svc.metrics.resident.set(len(svc.store.tasks()))
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    # -- listing -----------------------------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["tasks"], summary="The base and every task (vLLM's model list, with BitFit fields).")
    async def models() -> ModelList:
        store = svc.store
        tasks = store.tasks()
        base = ModelCard(id=store.base_name, created=int(min((t.loaded_at for t in tasks), default=time.time())), root=store.base_name, parent=None, kind=store.kind, bitfit=None)  # fmt: skip
        cards = [ModelCard(id=t.name, created=int(t.loaded_at), root=t.path, parent=store.base_name, kind=None, bitfit=_card(t)) for t in tasks]  # fmt: skip
        return ModelList(data=[base, *cards])

    @app.get("/v1/tasks", tags=["tasks"], summary="Every loaded task.")
    async def tasks() -> list[TaskCard]:
        return [_card(t) for t in svc.store.tasks()]

    @app.get("/v1/tasks/{task}", tags=["tasks"], summary="One loaded task.")
    async def task(task: str) -> TaskCard:
        try:
            return _card(svc.store.task(task))
        except UnknownTaskError:
            raise svc.unknown_task(task) from None

    # -- inference ---------------------------------------------------------------------------------------------------
    @app.post("/v1/predict", tags=["inference"], summary="Predict one input of one task.")
    async def predict(body: PredictRequest) -> PredictResponse:
        async def go() -> PredictResponse:
            svc.check(body.task, body.inputs, body.truncate, generate=False)
            svc.metrics.items.labels(task=label).inc()
            return _answer((await svc.run([(body.task, body.inputs)]))[0])

        label = svc.metrics.task_label(body.task) if _known(svc, body.task) else UNKNOWN
        return await observed("/v1/predict", label, go())

    @app.post("/v1/predict/batch", tags=["inference"], summary="Predict a mixed list of (task, inputs) items.")
    async def predict_batch(body: BatchPredictRequest) -> BatchPredictResponse:
        async def go() -> BatchPredictResponse:
            limit = min(settings.max_items_per_request, settings.max_queue)
            if len(body.items) > limit:
                raise ApiError(413, f"{len(body.items)} items in one request, more than {limit}: split the request.", "too_many_items")  # fmt: skip
            for i, item in enumerate(body.items):
                svc.check(item.task, item.inputs, body.truncate, generate=False, where=f" (items[{i}])")
            for item in body.items:
                svc.metrics.items.labels(task=svc.metrics.task_label(item.task)).inc()
            predictions = await svc.run([(item.task, item.inputs) for item in body.items])
            return BatchPredictResponse(predictions=[_answer(p) for p in predictions])

        return await observed("/v1/predict/batch", MIXED, go())

    @app.post("/v1/generate", tags=["inference"], summary="Generate from a prompt with one task of a decoder base.")
    async def generate(body: GenerateRequest) -> GenerateResponse:
        async def go() -> GenerateResponse:
            svc.check(body.task, body.prompt, False, generate=True)
            if body.max_new_tokens > settings.max_new_tokens:
                raise ApiError(422, f"max_new_tokens {body.max_new_tokens} is more than the server allows ({settings.max_new_tokens}): ask for fewer.", "invalid_input")  # fmt: skip
            request = GenerationRequest(
                task=body.task,
                prompt=body.prompt,
                max_new_tokens=body.max_new_tokens,
                do_sample=body.do_sample,
                temperature=body.temperature,
                top_p=body.top_p,
            )
            svc.metrics.items.labels(task=label).inc()
            return GenerateResponse(task=body.task, generated_text=(await svc.run([request]))[0])

        label = svc.metrics.task_label(body.task) if _known(svc, body.task) else UNKNOWN
        return await observed("/v1/generate", label, go())

    # -- admin -------------------------------------------------------------------------------------------------------
    async def load(body: AdapterLoadRequest) -> AdapterResponse:
        path = svc.resolve_adapter_path(body.path)
        async with svc.admin_lock:
            operation: Literal["load", "hotswap"] = "hotswap" if _known(svc, body.name) else "load"
            started = time.perf_counter()
            try:
                info = await asyncio.to_thread(svc.store.load, body.name, path)
            except AdapterError as exc:
                raise ApiError(422, f"{exc} The served tasks are unchanged.", "invalid_adapter") from None
            seconds = time.perf_counter() - started
        svc.metrics.adapter_ops.labels(operation=operation).observe(seconds)
        svc.metrics.resident.set(len(svc.store.tasks()))
        return AdapterResponse(operation=operation, name=body.name, seconds=seconds, task=_card(info))

    async def unload(name: str) -> AdapterResponse:
        async with svc.admin_lock:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(svc.store.unload, name)
            except UnknownTaskError:
                raise svc.unknown_task(name) from None
            seconds = time.perf_counter() - started
        svc.metrics.adapter_ops.labels(operation="unload").observe(seconds)
        svc.metrics.resident.set(len(svc.store.tasks()))
        return AdapterResponse(operation="unload", name=name, seconds=seconds)

    guarded: dict[str, Any] = {"tags": ["admin"], "dependencies": [Depends(admin)]}
    app.post("/v1/adapters", summary="Load a task, or hotswap it if loaded.", **guarded)(load)
    app.post("/v1/load_lora_adapter", summary="vLLM's name for POST /v1/adapters.", **guarded)(load)

    @app.delete("/v1/adapters/{name}", summary="Unload a task.", **guarded)
    async def delete_adapter(name: str) -> AdapterResponse:
        return await unload(name)

    @app.post("/v1/unload_lora_adapter", summary="vLLM's name for DELETE /v1/adapters/{name}.", **guarded)
    async def unload_lora(body: AdapterUnloadRequest) -> AdapterResponse:
        return await unload(body.name)

    return app


def _known(svc: _Service, task: str) -> bool:
    try:
        svc.store.task(task)
    except UnknownTaskError:
        return False
    return True


def _plain(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as JSON-safe dicts (pydantic puts the raw exception object in `ctx`)."""
    return [
        {k: ({n: str(x) for n, x in v.items()} if k == "ctx" else v) for k, v in dict(e).items() if k != "url"}
        for e in errors
    ]
