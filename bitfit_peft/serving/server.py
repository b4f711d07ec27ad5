"""The HTTP server: `create_app(settings)` builds the FastAPI app that serves every task of a `TaskStore`.

The app is the routes of `serving.routes` (one module per API family), one `Service` shared through a dependency,
request metrics as middleware, and the error handlers below: every `serving.errors.ServingError` becomes its own
status code here and nowhere else, in our shape (`ErrorResponse`) or, on the OpenAI routes, in OpenAI's. Anything
else is a bug of ours: 500 with a request id that the log shows beside the traceback. A classifier base serves the
predict routes (and embeddings), a decoder base the generation routes, so the OpenAPI schema lists exactly what the
server answers. Ray Serve mounts this same app (`serving.ray_app`). The routes, and why each is shaped as it is, are
in docs/serving-http.md. The app reads nothing from the environment: everything comes from `ServeSettings`.

>>> app = create_app(ServeSettings(base="models/minilm", adapters="adapters"))  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServingError, UnauthorizedError
from .metrics import MetricsMiddleware
from .routes import ROUTERS, is_openai
from .service import ServeSettings, Service
from .store import TaskStore

__all__ = ["ServeSettings", "create_app"]

logger = logging.getLogger(__name__)


def create_app(settings: ServeSettings, store: TaskStore | None = None) -> FastAPI:
    """The FastAPI app serving `store` (opened from `settings` at startup when not given). See the module doc."""
    svc = Service(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:  # uvicorn has finished the requests in flight; now finish whatever is still queued
            await svc.close()

    app = FastAPI(
        title="bitfit-peft serve",
        summary=f"Many BitFit tasks on one base model ({svc.kind}), batched across tasks.",
        lifespan=lifespan,
    )
    app.state.service = svc
    for kinds, router in ROUTERS:
        if svc.kind in kinds:
            app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    app.add_exception_handler(ServingError, serving_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    return app


def error_response(request: Request, status: int, message: str, error_type: str, **extra: Any) -> JSONResponse:
    """An error answer in the route's shape: OpenAI's on the OpenAI routes, `ErrorResponse` elsewhere."""
    headers = extra.pop("headers", None)
    route = request.scope.get("route")  # the route's own path: under a mount or Ray's route_prefix the URL differs
    if is_openai(getattr(route, "path", None) or request.url.path):
        status = 400 if status == 422 else status  # OpenAI answers invalid values with 400
        body: dict[str, Any] = {"error": {"message": message, "type": error_type, "param": extra.get("param"), "code": status}}  # fmt: skip
    else:
        body = {"error": message, "error_type": error_type, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse(body, status_code=status, headers=headers)


async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
    headers: dict[str, str] = {}
    if exc.retry:
        headers["Retry-After"] = str(request.app.state.service.settings.retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(request, exc.status, exc.message, exc.error_type, headers=headers or None, **exc.extra)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each failing field (400 in OpenAI's shape on the OpenAI routes); a body that is not JSON at all
    (no or another content type) gets 415 with the header to send."""
    errors = exc.errors()
    if any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        message = "The request body is not JSON: send it with the header `Content-Type: application/json`."
        return error_response(request, 415, message, "unsupported_media_type")
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(request, 400, "The request body is not valid JSON: check its syntax.", "invalid_json")
    detail = [
        {
            k: (v if k != "ctx" else {n: str(x) for n, x in v.items()})
            for k, v in e.items()
            if k not in ("url", "input")
        }
        for e in errors
    ]
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in detail)
    if is_openai(getattr(request.scope.get("route"), "path", None) or request.url.path):
        param = ".".join(str(p) for p in detail[0]["loc"][1:]) if detail else None
        return error_response(request, 400, f"Invalid request: {fields}", "invalid_request_error", param=param)
    return error_response(request, 422, f"Invalid request: {fields}", "invalid_request", detail=detail)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path 404, method 405, a body that is not valid JSON 400), in our shape."""
    message = "The request body is not valid JSON: check its syntax." if exc.status_code == 400 else str(exc.detail)
    error_type = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, message, error_type, headers=getattr(exc, "headers", None))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:16]
    logger.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
    message = f"Internal server error (request id {request_id}): this is a bug of the server, not of the request; report the id."  # fmt: skip
    return error_response(request, 500, message, "internal", request_id=request_id)
