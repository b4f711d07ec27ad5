"""`/health`, `/ready` and Prometheus `/metrics`: answered from memory, never waiting for the model or a lock."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ..service import Svc

router = APIRouter(tags=["health"])


class Status(BaseModel):
    status: str


@router.get("/health", summary="200 while the model worker runs.", responses={503: {"model": Status}})
async def health(svc: Svc) -> JSONResponse:
    ok = svc.worker is not None and svc.worker.alive
    return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)


@router.get("/ready", summary="200 while new requests are taken; 503 while starting or draining.",
            responses={200: {"model": Status}, 503: {"model": Status}})  # fmt: skip
async def ready(svc: Svc) -> JSONResponse:
    ok = svc.worker is not None and svc.worker.accepting
    return JSONResponse({"status": "ready" if ok else "unavailable"}, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics.",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}}},
)
async def metrics(svc: Svc) -> Response:
    if svc.store is not None:
        svc.metrics.resident.set(len(svc.store.tasks()))
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)
