"""What the route modules share: the documented error answers of a route, and the admin-key dependency."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..errors import UnauthorizedError
from ..schemas import ErrorResponse
from ..service import Svc

__all__ = ["OPENAI_PATHS", "OpenAIError", "OpenAIErrorResponse", "admin_key", "documented", "is_openai"]

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")

WHY = {
    400: "The body is not valid JSON, or (OpenAI routes) a field is invalid.",
    401: "An admin route without the server's API key.",
    403: "An adapter path outside the adapters directory.",
    404: "Unknown task (the answer lists the loaded ones), or no adapter directory at that path.",
    413: "An input longer than --max-length tokens (without truncate), or too many items in one request.",
    415: "The body is not JSON (send `Content-Type: application/json`).",
    422: "A field is invalid (`detail` names it), or the adapter cannot be served (the tasks are unchanged).",
    429: "The queue (or the generation budget of tokens in flight) is full: retry after `Retry-After` seconds.",
    500: "A bug of the server: the answer gives the request id that its log shows.",
    503: "Starting or shutting down: retry after `Retry-After` seconds.",
    504: "No result within --request-timeout.",
}
RETRY = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, used by the OpenAI-compatible routes."""

    error: OpenAIError


def is_openai(path: str) -> bool:
    """Whether `path` is an OpenAI-compatible route (its errors use OpenAI's shape)."""
    return path in OPENAI_PATHS


def documented(*codes: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it can answer, with its body model (and 500, always)."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 400, 415, 500}):
        entry: dict[str, Any] = {"model": model, "description": WHY[code]}
        if code in (429, 503):
            entry["headers"] = RETRY
        out[code] = entry
    return out


_bearer = HTTPBearer(auto_error=False, description="The API key, needed by the admin routes when one is set.")


async def admin_key(svc: Svc, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Refuse an admin request without the server's API key (when one is set), in constant time."""
    key = svc.settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise UnauthorizedError("Admin routes need the server's API key: send `Authorization: Bearer <key>`.")
