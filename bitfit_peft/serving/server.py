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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import AdapterError, GenerationRequest, TaskStore, UnknownTaskError
from .batcher import Batcher
from .metrics import MIXED, UNKNOWN
from .schemas import (
    AdapterLoadRequest,
    AdapterResponse,
    AdapterUnloadRequest,
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    PredictRequest,
    PredictResponse,
    TaskCard,
)
from .service import ApiError, ServeSettings, Service, answer, card, known, plain_errors

__all__ = ["ApiError", "ServeSettings", "create_app"]

logger = logging.getLogger(__name__)
# Module level: FastAPI resolves the (postponed) annotations of the handlers in this module's globals.
Credentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The API key, needed by the admin routes when one is set.")),
]


def create_app(settings: ServeSettings, store: TaskStore | None = None) -> FastAPI:
    """The FastAPI app serving `store` (opened from `settings` at startup when not given). See the module doc."""
    svc = Service(settings, store)

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
                forward_cost_tokens=settings.forward_cost_tokens,
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
        return JSONResponse({"detail": plain_errors(exc.errors())}, status_code=422)

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
        cards = [ModelCard(id=t.name, created=int(t.loaded_at), root=t.path, parent=store.base_name, kind=None, bitfit=card(t)) for t in tasks]  # fmt: skip
        return ModelList(data=[base, *cards])

    @app.get("/v1/tasks", tags=["tasks"], summary="Every loaded task.")
    async def tasks() -> list[TaskCard]:
        return [card(t) for t in svc.store.tasks()]

    @app.get("/v1/tasks/{task}", tags=["tasks"], summary="One loaded task.")
    async def task(task: str) -> TaskCard:
        try:
            return card(svc.store.task(task))
        except UnknownTaskError:
            raise svc.unknown_task(task) from None

    # -- inference ---------------------------------------------------------------------------------------------------
    @app.post("/v1/predict", tags=["inference"], summary="Predict one input of one task.")
    async def predict(body: PredictRequest) -> PredictResponse:
        async def go() -> PredictResponse:
            svc.check(body.task, body.inputs, body.truncate, generate=False)
            svc.metrics.items.labels(task=label).inc()
            return answer((await svc.run([(body.task, body.inputs)]))[0])

        label = svc.metrics.task_label(body.task) if known(svc, body.task) else UNKNOWN
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
            return BatchPredictResponse(predictions=[answer(p) for p in predictions])

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

        label = svc.metrics.task_label(body.task) if known(svc, body.task) else UNKNOWN
        return await observed("/v1/generate", label, go())

    # -- admin -------------------------------------------------------------------------------------------------------
    async def load(body: AdapterLoadRequest) -> AdapterResponse:
        path = svc.resolve_adapter_path(body.path)
        async with svc.admin_lock:
            operation: Literal["load", "hotswap"] = "hotswap" if known(svc, body.name) else "load"
            started = time.perf_counter()
            try:
                info = await asyncio.to_thread(svc.store.load, body.name, path)
            except AdapterError as exc:
                raise ApiError(422, f"{exc} The served tasks are unchanged.", "invalid_adapter") from None
            seconds = time.perf_counter() - started
        svc.metrics.adapter_ops.labels(operation=operation).observe(seconds)
        svc.metrics.resident.set(len(svc.store.tasks()))
        return AdapterResponse(operation=operation, name=body.name, seconds=seconds, task=card(info))

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
