"""Embedding routes of an encoder base: OpenAI's `/v1/embeddings` and text-embeddings-inference's `/embed`.

`model` names the task whose deltas the encoder runs with (the base's name, or no `model` on `/embed`: none), so an
embedding task tuned with BitFit serves beside classification tasks on one base, in the same mixed batches. Pooling
and normalisation come from the checkpoint's sentence-transformers config (`serving.pooling`).
"""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ...constants import BASE
from ..errors import TooManyItemsError
from ..openai_schemas import Embedding, EmbeddingRequest, EmbeddingResponse, Usage
from ..schemas import NonBlank
from ..service import Service, Svc
from ..store import EmbedItem
from .common import documented

router = APIRouter(tags=["inference"])


class EmbedRequest(BaseModel):
    """TEI's `/embed` body, plus `model` (a task; absent: the base)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    inputs: NonBlank | Annotated[list[NonBlank], Field(min_length=1)]
    normalize: bool = Field(True, description="L2-normalise each embedding (TEI's default).")
    truncate: bool = Field(False, description="Truncate inputs longer than --max-length tokens instead of a 413.")
    model: str | None = Field(None, validation_alias=AliasChoices("model", "task"), max_length=128)


async def _embed(svc: Service, request: Request, model: str | None, texts: list[str], truncate: bool) -> list[tuple[list[float], int]]:  # fmt: skip
    task = BASE if model in (None, svc.store.base_name) else str(model)
    request.state.task = (
        "base" if task == BASE else svc.metrics.task_label(svc.store.task(task).name)
    )  # 404 before queueing
    limit = min(svc.settings.max_items_per_request, svc.settings.max_queue)
    if len(texts) > limit:
        raise TooManyItemsError(f"{len(texts)} inputs in one request, more than {limit}: split the request.")
    return await svc.run([EmbedItem(task, text, truncate) for text in texts])


@router.post("/v1/embeddings", summary="OpenAI embeddings; `model` names the task (the base's name: no adapter).",
             responses=documented(404, 413, 429, 503, 504, openai=True))  # fmt: skip
async def embeddings(body: EmbeddingRequest, request: Request, svc: Svc) -> EmbeddingResponse:
    texts = body.texts()
    results = await _embed(svc, request, body.model, texts, truncate=True)
    tokens = sum(n for _, n in results)
    if body.encoding_format == "base64":  # what the openai client asks for by default
        data = [Embedding(index=i, embedding=base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()) for i, (v, _) in enumerate(results)]  # fmt: skip
    else:
        data = [Embedding(index=i, embedding=v) for i, (v, _) in enumerate(results)]
    return EmbeddingResponse(data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.post("/embed", summary="text-embeddings-inference's /embed (`model`: a task; absent: the base).",
             responses=documented(404, 413, 422, 429, 503, 504))  # fmt: skip
async def embed(body: EmbedRequest, request: Request, svc: Svc) -> list[list[float]]:
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    vectors = [v for v, _ in await _embed(svc, request, body.model, texts, body.truncate)]
    if body.normalize and not svc.store.pooling.normalize:
        vectors = torch.nn.functional.normalize(torch.tensor(vectors), dim=-1).tolist()
    return vectors
