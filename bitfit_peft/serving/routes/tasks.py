"""Listing: `/v1/models` (vLLM's model list, with BitFit fields), `/v1/tasks` and `/v1/tasks/{task}`."""

from __future__ import annotations

import time

from fastapi import APIRouter

from ..prepare import TaskInfo
from ..schemas import ModelCard, ModelList
from ..service import Svc
from .common import documented

router = APIRouter(tags=["tasks"])


@router.get("/v1/models", summary="The base and every task (vLLM's model list, with BitFit fields).",
            responses=documented())  # fmt: skip
async def models(svc: Svc) -> ModelList:
    store, tasks = svc.store, svc.store.tasks()
    created = int(min((t.loaded_at for t in tasks), default=time.time()))
    base = ModelCard(
        id=store.base_name, created=created, root=store.base_name, parent=None, kind=svc.kind, bitfit=None
    )
    cards = [ModelCard(id=t.name, created=int(t.loaded_at), root=t.path, parent=store.base_name, kind=None, bitfit=t) for t in tasks]  # fmt: skip
    return ModelList(data=[base, *cards])


@router.get("/v1/tasks", summary="Every loaded task.", responses=documented())
async def tasks(svc: Svc) -> list[TaskInfo]:
    return svc.store.tasks()  # type: ignore[no-any-return]


@router.get("/v1/tasks/{task}", summary="One loaded task.", responses=documented(404))
async def task(task: str, svc: Svc) -> TaskInfo:
    return svc.store.task(task)  # type: ignore[no-any-return]
