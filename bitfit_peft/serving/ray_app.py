"""Ray Serve deployment of a `TaskStore`: scale mixed-task serving out over replicas and machines.

Every replica holds the base model and *all* adapters (one `TaskStore`), and `@serve.batch` gathers the requests that
reach a replica, for any tasks, into one mixed `TaskStore.predict` per batch; Ray's proxy spreads requests over the
replicas. Ray's `@serve.multiplexed` is deliberately not used per task: it splits batches by model id, which would
undo mixed batching (see docs/serving-ray.md for sharding adapter sets too large for one replica).

Needs the optional extra: `pip install "bitfit-peft[ray]"`.

Routes, named like the FastAPI server's (`bitfit_peft.serving.server`) so clients carry over:
`POST /v1/predict` (the server's `PredictRequest`: `{"task": ..., "inputs": ...}`, `model` and `adapter_id` accepted
for `task`, `"truncate": true` to cut inputs longer than `max_length` instead of a 413), `GET /v1/models` and
`GET /health`.

>>> from ray import serve  # doctest: +SKIP
>>> serve.run(build_app("models/minilm", "adapters/", replicas=2))  # doctest: +SKIP
"""

# No `from __future__ import annotations`: serve.ingress rewrites the route methods' signatures, and FastAPI then
# cannot resolve string annotations (the request body would be read as a query parameter).
import asyncio
import contextlib
import ctypes
import dataclasses
import os
import time
from typing import Any

try:
    from ray import serve
    from ray.serve import Application
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError(
        f"bitfit_peft.serving.ray_app needs Ray Serve ({err}): install it with pip install 'bitfit-peft[ray]'."
    ) from None
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from .adapters import UnknownTaskError
from .schemas import Inputs, ModelCard, ModelList, PredictRequest, PredictResponse, TaskCard
from .store import Prediction, TaskStore

__all__ = ["AppArgs", "BitFitDeployment", "RayPredictResponse", "app_builder", "build_app"]

api = FastAPI(title="bitfit-peft on Ray Serve", description="Many BitFit tasks on one base, in mixed batches.")


class RayPredictResponse(PredictResponse):
    """The HTTP server's prediction, and which replica and batch served it."""

    replica: str = Field(description="The Ray Serve replica that answered (its id and process id).")
    batch_size: int = Field(description="Requests in the mixed batch this one ran in.")
    batch_tasks: int = Field(description="Distinct tasks in that batch (more than 1: the batch mixed tasks).")


class AppArgs(BaseModel):
    """Arguments of `app_builder`, for `serve run` and config files (`args:`); see `build_app`."""

    model_config = ConfigDict(extra="forbid")
    base: str
    adapters: str
    replicas: int = Field(1, ge=1)
    dtype: str = "float32"
    max_length: int = Field(128, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    threads: int | None = Field(None, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)


Outcome = tuple[Prediction, int, int] | Exception


# Defined before the deployment: serve.ingress pickles the class by value when it is decorated, with the globals
# its methods use that exist at that moment.
def _trim_heap() -> None:
    """Hand the heap freed after loading (every adapter file was read whole before the tables were filled) back to
    the OS, so a replica's RSS is what it holds, not its loading peak (glibc only; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@serve.deployment(name="BitFitDeployment")
@serve.ingress(api)
class BitFitDeployment:
    """One replica: a `TaskStore` with the base and every adapter under `adapters`, answering mixed batches.

    Args:
        base (`str`): local directory (or hub id) of the base model with its tokenizer; every node must reach it.
        adapters (`str`): directory of `<task>/` adapter folders, on every node.
        dtype (`str`): `float32`, `bfloat16` or `float16`.
        max_length (`int`): longest input in tokens; longer inputs get a 413 unless the request sends
            `"truncate": true`.
        max_batch_size (`int`): most requests in one mixed forward.
        batch_wait_timeout_s (`float`): longest wait for a batch to fill after its first request.
        threads (`int`, *optional*): torch intra-op threads of this replica (default: torch's choice); set it to the
            replica's `num_cpus` so replicas on one node do not oversubscribe its cores.
    """

    def __init__(
        self,
        base: str,
        adapters: str,
        dtype: str = "float32",
        max_length: int = 128,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.store = TaskStore.open(base, adapters, dtype=dtype, max_length=max_length)
        if not self.store.tasks():
            raise ValueError(
                f"No adapter could be served from {adapters!r} (refused: {self.store.refused or 'none found'}); "
                "point `adapters` at a directory of <task>/adapter_config.json folders trained on this base."
            )
        # serve.batch's setters (its decorator takes constants); Ray's stubs do not declare them
        _trim_heap()
        self.predict_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.replica = f"{serve.get_replica_context().replica_id.unique_id}/pid{os.getpid()}"

    @api.get("/health", summary="200 while the replica serves.")
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "tasks": len(self.store.tasks()), "replica": self.replica}

    @api.get("/v1/models", summary="The base and every task (vLLM's model list, as the HTTP server gives it).")
    def models(self) -> ModelList:
        store, tasks = self.store, self.store.tasks()
        created = int(min((t.loaded_at for t in tasks), default=time.time()))
        base = ModelCard(
            id=store.base_name, created=created, root=store.base_name, parent=None, kind=store.kind, bitfit=None
        )
        cards = [
            ModelCard(
                id=t.name,
                created=int(t.loaded_at),
                root=t.path,
                parent=store.base_name,
                kind=None,
                bitfit=TaskCard(**dataclasses.asdict(t)),
            )
            for t in tasks
        ]
        return ModelList(data=[base, *cards])

    @api.post("/v1/predict", summary="Predict one input of one task (batched with other tasks' requests).")
    async def predict(self, request: PredictRequest) -> RayPredictResponse:
        try:
            self.store.task(request.task)
        except UnknownTaskError as err:
            raise HTTPException(status_code=404, detail=str(err)) from None
        if not request.truncate and (tokens := self.store.count_tokens(request.inputs)) > self.store.max_length:
            raise HTTPException(
                status_code=413,
                detail=f"inputs has {tokens} tokens, more than max_length={self.store.max_length}: shorten it, or "
                'send "truncate": true to cut it to the first tokens.',
            )
        outcome = await self.predict_batch((request.task, request.inputs))
        if isinstance(outcome, UnknownTaskError):  # unloaded after the check above
            raise HTTPException(status_code=404, detail=str(outcome))
        if isinstance(outcome, ValueError):
            raise HTTPException(status_code=422, detail=str(outcome))
        if isinstance(outcome, Exception):
            raise outcome
        pred, size, tasks = outcome
        return RayPredictResponse(
            task=pred.task,
            label=pred.label,
            scores=pred.scores,
            score=pred.score,
            logits=pred.logits,
            replica=self.replica,
            batch_size=size,
            batch_tasks=tasks,
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[str, Inputs]]) -> list[Outcome]:
        """One mixed `predict` over the batch, run off the event loop so the next batch fills meanwhile. If it
        fails, each item runs alone, so one bad request fails only itself."""
        tasks = len({task for task, _ in items})
        try:
            preds = await asyncio.to_thread(self.store.predict, items)
            return [(p, len(items), tasks) for p in preds]
        except (UnknownTaskError, ValueError):
            return [await self._alone(item) for item in items]

    async def _alone(self, item: tuple[str, Inputs]) -> Outcome:
        try:
            return ((await asyncio.to_thread(self.store.predict, [item]))[0], 1, 1)
        except (UnknownTaskError, ValueError) as err:
            return err


def build_app(
    base: str,
    adapters: str,
    replicas: int = 1,
    *,
    dtype: str = "float32",
    max_length: int = 128,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.01,
    threads: int | None = None,
    num_cpus: float = 1.0,
    max_ongoing_requests: int | None = None,
) -> Application:
    """The bound application: `replicas` copies of `BitFitDeployment`, each reserving `num_cpus` CPUs and taking up to
    `max_ongoing_requests` requests at once (default: twice `max_batch_size`, so the next batch fills while one
    runs; Serve's own default of 5 would cap every batch at 5). Run it with `serve.run(build_app(...))`. See
    `BitFitDeployment` for the other arguments."""
    args = AppArgs(
        base=base,
        adapters=adapters,
        replicas=replicas,
        dtype=dtype,
        max_length=max_length,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        threads=threads,
        num_cpus=num_cpus,
        max_ongoing_requests=max_ongoing_requests,
    )
    return app_builder(args)


def app_builder(args: AppArgs | dict[str, Any]) -> Application:
    """The application from `AppArgs` (or the dict `serve run` and Serve config files pass, validated here): the
    import path `bitfit_peft.serving.ray_app:app_builder` with `args: {base: ..., adapters: ...}`."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    # @serve.deployment made the class a serve.Deployment, which mypy cannot see
    deployment = BitFitDeployment.options(  # type: ignore[attr-defined]
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch_size,
        ray_actor_options={"num_cpus": args.num_cpus},
    )
    return deployment.bind(
        args.base,
        args.adapters,
        dtype=args.dtype,
        max_length=args.max_length,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        threads=args.threads,
    )
