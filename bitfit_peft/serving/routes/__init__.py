"""The HTTP routes, one module per API family, and which base kinds serve each (`ROUTERS`)."""

from __future__ import annotations

from fastapi import APIRouter

from . import admin, embeddings, generate, health, predict, tasks
from .common import OPENAI_PATHS, is_openai

__all__ = ["OPENAI_PATHS", "ROUTERS", "is_openai"]

BOTH = ("classifier", "generator")
ROUTERS: list[tuple[tuple[str, ...], APIRouter]] = [
    (BOTH, health.router),
    (BOTH, tasks.router),
    (("classifier",), predict.router),
    (("classifier",), embeddings.router),
    (("generator",), generate.router),
    (BOTH, admin.router),
]
