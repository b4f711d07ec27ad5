"""Generation routes of a decoder base: OpenAI's `/v1/completions` and `/v1/chat/completions` (with server-sent
events when `stream` is true), and `/v1/generate` (vLLM/LoRAX-style text generation, kept for earlier clients).

A handler resolves the task, turns the request into `SamplingParams` and submits it to the generation engine, which
tokenizes, schedules and decodes on its own thread (continuous batching across tasks, `serving.engine`); the handler
only awaits the engine's handle.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ...constants import BASE
from ..errors import BadInputError, TimedOutError
from ..openai_schemas import ChatRequest, Choice, CompletionRequest, CompletionResponse, Usage
from ..schemas import GenerateRequest, GenerateResponse
from ..service import Service, Svc
from .common import documented

router = APIRouter(tags=["inference"])
STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "With `stream`: server-sent events."}}  # fmt: skip
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _submit(svc: Service, request: Request, model: str, prompt: Any, body: Any, budget: int | None) -> Any:
    """Resolve the task (the base's name: no adapter), check the budget and submit; the engine's handle."""
    from ..engine import SamplingParams

    task = BASE if model == svc.store.base_name else model
    request.state.task = "base" if task == BASE else svc.metrics.task_label(svc.store.task(task).name)
    max_tokens = budget or DEFAULT_MAX_TOKENS
    if max_tokens > svc.settings.max_new_tokens:
        raise BadInputError(f"max_tokens {max_tokens} is more than the server allows ({svc.settings.max_new_tokens}): ask for fewer.")  # fmt: skip
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stops())  # fmt: skip
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    return svc.engine.submit(task, prompt, params)


async def _wait(svc: Service, handle: Any) -> Any:
    try:
        return await asyncio.wait_for(handle.wait(), svc.settings.request_timeout_s)
    except TimeoutError:
        handle.cancel()
        raise TimedOutError(f"No result within {svc.settings.request_timeout_s} s: retry, or raise --request-timeout.") from None  # fmt: skip


async def _answer(svc: Service, handle: Any, body: Any, chat: bool) -> Any:
    """The whole completion, or (with `stream`) server-sent events; errors before the first token keep their
    status code, since the stream starts only once the first text (or the end) is there."""
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    kind: Literal["text_completion", "chat.completion"] = "chat.completion" if chat else "text_completion"
    if not body.stream:
        done = await _wait(svc, handle)
        choice = Choice(message={"role": "assistant", "content": done.text}) if chat else Choice(text=done.text)
        choice.finish_reason = done.finish_reason
        usage = Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, total_tokens=done.prompt_tokens + done.completion_tokens)  # fmt: skip
        return CompletionResponse(
            id=rid, object=kind, created=created, model=body.model, choices=[choice], usage=usage
        )
    deltas = handle.stream().__aiter__()
    try:
        first: str | None = await asyncio.wait_for(deltas.__anext__(), svc.settings.request_timeout_s)
    except StopAsyncIteration:
        first = None
    except BaseException:
        handle.cancel()
        raise
    return StreamingResponse(_events(handle, deltas, first, body, rid, created, chat), media_type="text/event-stream")


async def _events(handle: Any, deltas: AsyncIterator[str], first: str | None, body: Any, rid: str, created: int, chat: bool) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's chunks: one per text delta, a last one with `finish_reason`, `usage` if asked, then `[DONE]`."""

    def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None) -> str:
        body_ = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                 "model": body.model, "choices": [choice] if choice else []}  # fmt: skip
        if usage is not None:
            body_["usage"] = usage
        return f"data: {json.dumps(body_)}\n\n"

    def piece(text: str | None, finish: str | None = None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    try:
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        if first is not None:
            yield chunk(piece(first))
            async for text in deltas:
                yield chunk(piece(text))
        done = await handle.wait()
        yield chunk(piece(None, done.finish_reason))
        if body.stream_options is not None and body.stream_options.include_usage:
            total = done.prompt_tokens + done.completion_tokens
            yield chunk({}, {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total})  # fmt: skip
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the headers: the error goes in the stream, in OpenAI's shape
        error = {"message": str(exc), "type": getattr(exc, "error_type", "internal"), "code": getattr(exc, "status", 500)}  # fmt: skip
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        handle.cancel()  # a no-op once done; frees the row when the client went away


@router.post("/v1/completions", summary="OpenAI completions; `model` names the task (the base's name: no adapter).",
             response_model=CompletionResponse, responses={**STREAM, **documented(400, 404, 413, 429, 503, 504, openai=True)})  # fmt: skip
async def completions(body: CompletionRequest, request: Request, svc: Svc) -> Any:
    handle = _submit(svc, request, body.model, body.text(), body, body.max_tokens)
    return await _answer(svc, handle, body, chat=False)


@router.post("/v1/chat/completions", summary="OpenAI chat completions, with the tokenizer's chat template.",
             response_model=CompletionResponse, responses={**STREAM, **documented(400, 404, 413, 429, 503, 504, openai=True)})  # fmt: skip
async def chat_completions(body: ChatRequest, request: Request, svc: Svc) -> Any:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    handle = _submit(svc, request, body.model, messages, body, body.budget())
    return await _answer(svc, handle, body, chat=True)


@router.post("/v1/generate", summary="Generate from a prompt with one task (greedy unless do_sample).",
             responses=documented(404, 413, 422, 429, 503, 504))  # fmt: skip
async def generate(body: GenerateRequest, request: Request, svc: Svc) -> GenerateResponse:
    from ..engine import SamplingParams

    request.state.task = svc.metrics.task_label(svc.store.task(body.task).name)
    if body.max_new_tokens > svc.settings.max_new_tokens:
        raise BadInputError(f"max_new_tokens {body.max_new_tokens} is more than the server allows ({svc.settings.max_new_tokens}): ask for fewer.")  # fmt: skip
    temperature = body.temperature if body.do_sample else 0.0
    params = SamplingParams(max_tokens=body.max_new_tokens, temperature=temperature, top_p=body.top_p)
    done = await _wait(svc, svc.engine.submit(body.task, body.prompt, params))
    return GenerateResponse(task=body.task, generated_text=done.text)
