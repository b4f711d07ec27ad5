"""Admin routes: load or hotswap a task, unload one (also under vLLM's names). They need the API key when one is set.

The path check runs first, then the store's load runs in a thread (reading and checking the file, then a short
writer-locked install), so the event loop never waits for a forward or a file.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends

from ..errors import AdapterError
from ..schemas import AdapterLoadRequest, AdapterResponse, AdapterUnloadRequest
from ..service import Service, Svc
from .common import admin_key, documented

router = APIRouter(tags=["admin"], dependencies=[Depends(admin_key)])


async def _load(svc: Service, body: AdapterLoadRequest) -> AdapterResponse:
    path = svc.resolve_adapter_path(body.path)
    async with svc.admin_lock:
        operation: Literal["load", "hotswap"] = "hotswap" if body.name in {t.name for t in svc.store.tasks()} else "load"  # fmt: skip
        started = time.perf_counter()
        try:
            info = await asyncio.to_thread(svc.store.load, body.name, path)
        except AdapterError as exc:
            raise AdapterError(f"{exc} The served tasks are unchanged.") from None
        seconds = time.perf_counter() - started
    svc.metrics.adapter_ops.labels(operation=operation).observe(seconds)
    svc.metrics.resident.set(len(svc.store.tasks()))
    return AdapterResponse(operation=operation, name=body.name, seconds=seconds, task=info)


async def _unload(svc: Service, name: str) -> AdapterResponse:
    async with svc.admin_lock:
        started = time.perf_counter()
        await asyncio.to_thread(svc.store.unload, name)
        seconds = time.perf_counter() - started
    svc.metrics.adapter_ops.labels(operation="unload").observe(seconds)
    svc.metrics.resident.set(len(svc.store.tasks()))
    return AdapterResponse(operation="unload", name=name, seconds=seconds)


@router.post("/v1/adapters", summary="Load a task, or hotswap it if loaded.", responses=documented(401, 403, 404, 422))
async def load(body: AdapterLoadRequest, svc: Svc) -> AdapterResponse:
    return await _load(svc, body)


@router.post("/v1/load_lora_adapter", summary="vLLM's name for POST /v1/adapters.", responses=documented(401, 403, 404, 422))  # fmt: skip
async def load_lora_adapter(body: AdapterLoadRequest, svc: Svc) -> AdapterResponse:
    return await _load(svc, body)


@router.delete("/v1/adapters/{name}", summary="Unload a task.", responses=documented(401, 404))
async def delete_adapter(name: str, svc: Svc) -> AdapterResponse:
    return await _unload(svc, name)


@router.post("/v1/unload_lora_adapter", summary="vLLM's name for DELETE /v1/adapters/{name}.", responses=documented(401, 404, 422))  # fmt: skip
async def unload_lora_adapter(body: AdapterUnloadRequest, svc: Svc) -> AdapterResponse:
    return await _unload(svc, body.name)
