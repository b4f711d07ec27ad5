"""Ray Serve deployment of the HTTP server: scale mixed-task serving out over replicas and machines.

Every replica runs the same FastAPI app as `bitfit-peft serve` (`serving.server.create_app`, mounted with
`@serve.ingress`), so routes, request and response bodies, errors and /metrics are the server's, generation and
streaming included; each replica holds the base model and *all* adapters (one `TaskStore`) and batches the requests
that reach it, for any tasks, in its own batcher (or generation engine). Ray's proxy spreads requests over the
replicas. Ray's `@serve.multiplexed` is deliberately not used per task: it splits batches by model id, which would
undo mixed batching (see docs/serving-ray.md for sharding adapter sets too large for one replica). Each answer
carries the header `x-bitfit-replica` (the Serve replica id and process id).

Needs the optional extra: `pip install "bitfit-peft[ray]"`.

>>> from ray import serve  # doctest: +SKIP
>>> serve.run(build_app("models/minilm", "adapters/", replicas=2))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
from typing import Any

try:
    from ray import serve
    from ray.serve import Application
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError(
        f"bitfit_peft.serving.ray_app needs Ray Serve ({err}): install it with pip install 'bitfit-peft[ray]'."
    ) from None
import torch
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from .server import create_app
from .service import ServeSettings
from .store import TaskStore

__all__ = ["AppArgs", "BitFitDeployment", "app_builder", "build_app"]

REPLICA_HEADER = "x-bitfit-replica"


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


def _trim_heap() -> None:
    """Hand the heap freed after loading (every adapter file was read whole before the tables were filled) back to
    the OS, so a replica's RSS is what it holds, not its loading peak (glibc only; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@serve.deployment(name="BitFitDeployment")
@serve.ingress()
class BitFitDeployment:
    """One replica: the HTTP server's app over a `TaskStore` with the base and every adapter under `adapters`.

    Args:
        settings (`dict`): `ServeSettings` fields (`base`, `adapters`, `max_batch_size`, `max_wait_ms`, ...).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings(**settings)
        if self.settings.threads is not None:
            torch.set_num_threads(self.settings.threads)
        s = self.settings
        self.store = TaskStore.open(s.base, s.adapters, dtype=s.dtype, device=s.device, max_length=s.max_length,
                                    forward_cost_tokens=s.forward_cost_tokens)  # fmt: skip
        if not self.store.tasks():
            raise ValueError(
                f"No adapter could be served from {s.adapters!r} (refused: {self.store.refused or 'none found'}); "
                "point `adapters` at a directory of <task>/adapter_config.json folders trained on this base."
            )
        _trim_heap()
        self.replica = f"{serve.get_replica_context().replica_id.unique_id}/pid{os.getpid()}"

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The server's own app (Ray runs its lifespan: the batcher starts and drains with the replica)."""
        app = create_app(self.settings, self.store)
        replica = self.replica

        @app.middleware("http")
        async def tag(request: Request, call_next: Any) -> Response:
            response: Response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


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
    runs; Serve's own default of 5 would cap every batch at 5). Run it with `serve.run(build_app(...))`.
    `batch_wait_timeout_s` is the server's `max_wait_ms` (in seconds); `threads` sets torch's intra-op threads of
    each replica: set it to `num_cpus` so replicas on one node do not oversubscribe its cores."""
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
    settings = ServeSettings(base=args.base, adapters=args.adapters, dtype=args.dtype, max_length=args.max_length,
                             max_batch_size=args.max_batch_size, max_wait_ms=args.batch_wait_timeout_s * 1000,
                             threads=args.threads)  # fmt: skip
    # @serve.deployment made the class a serve.Deployment, which mypy cannot see
    deployment = BitFitDeployment.options(  # type: ignore[attr-defined]
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch_size,
        ray_actor_options={"num_cpus": args.num_cpus},
    )
    return deployment.bind(dataclasses.asdict(settings))
