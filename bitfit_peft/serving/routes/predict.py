"""Prediction routes of a classifier base: `/v1/predict` (one item) and `/v1/predict/batch` (a mixed list).

A handler checks what it can from memory (the task exists, the item count), queues the items on the batcher and
awaits them; tokenization, the length check and the model run on the batcher's thread.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import TooManyItemsError, UnknownTaskError
from ..metrics import MIXED
from ..schemas import BatchPredictRequest, BatchPredictResponse, PredictRequest
from ..service import Svc
from ..store import Prediction
from .common import documented

router = APIRouter(tags=["inference"])


@router.post("/v1/predict", summary="Predict one input of one task.", responses=documented(404, 413, 422, 429, 503, 504))  # fmt: skip
async def predict(body: PredictRequest, request: Request, svc: Svc) -> Prediction:
    request.state.task = label = svc.metrics.task_label(svc.store.task(body.task).name)  # 404 before queueing
    svc.metrics.items.labels(task=label).inc()
    return (await svc.run([(body.task, body.inputs, body.truncate)]))[0]  # type: ignore[no-any-return]


@router.post("/v1/predict/batch", summary="Predict a mixed list of (task, inputs) items.",
             responses=documented(404, 413, 422, 429, 503, 504))  # fmt: skip
async def predict_batch(body: BatchPredictRequest, request: Request, svc: Svc) -> BatchPredictResponse:
    request.state.task = MIXED
    limit = min(svc.settings.max_items_per_request, svc.settings.max_queue)
    if len(body.items) > limit:
        raise TooManyItemsError(f"{len(body.items)} items in one request, more than {limit}: split the request.")
    for i, item in enumerate(body.items):  # every item is checked before any is queued
        try:
            svc.store.task(item.task)
        except UnknownTaskError as err:
            raise UnknownTaskError(item.task, err.known, where=f" (items[{i}])") from None
    for item in body.items:
        svc.metrics.items.labels(task=svc.metrics.task_label(item.task)).inc()
    return BatchPredictResponse(
        predictions=await svc.run([(item.task, item.inputs, body.truncate) for item in body.items])
    )
