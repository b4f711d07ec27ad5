"""The serving errors, as types: each says what went wrong, its HTTP status and its `error_type`, in this one place.

The engine (store, batcher, generation) raises these; the HTTP app maps any `ServingError` to its status with one
handler (`bitfit_peft.serving.server`), so a route never picks a status code itself. Anything that is not a
`ServingError` is a bug of ours: the app answers 500 with a request id and logs the traceback under that id, instead
of blaming the client with a 4xx.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterError",
    "BadInputError",
    "DrainingError",
    "ForbiddenPathError",
    "MissingAdapterError",
    "OverloadedError",
    "ServingError",
    "StartingError",
    "TimedOutError",
    "TooLongError",
    "TooManyItemsError",
    "UnauthorizedError",
    "UnknownTaskError",
    "WrongRouteError",
]


class ServingError(Exception):
    """Base of every error a client can cause or be told about; `status` and `error_type` go into the answer."""

    status = 500
    error_type = "internal"
    retry = False  # answered with `Retry-After`

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.error_type


class BadInputError(ServingError, ValueError):
    """An input the model cannot take (empty text, wrong shape, bad sampling value): 422."""

    status, error_type = 422, "invalid_input"


class TooLongError(BadInputError):
    """An input longer than the server's limit: 413."""

    status, error_type = 413, "too_long"


class TooManyItemsError(BadInputError):
    """More items in one request than the server takes: 413."""

    status, error_type = 413, "too_many_items"


class WrongRouteError(BadInputError):
    """A request this base cannot serve on this route (a task of another kind): 400."""

    status, error_type = 400, "wrong_route"


class UnknownTaskError(ServingError, KeyError):
    """A task that is not loaded: 404; the message lists (some of) the tasks that are."""

    status, error_type = 404, "unknown_task"
    LISTED = 50

    def __init__(self, task: str, known: list[str], where: str = "") -> None:
        self.task, self.known = task, known
        shown = ", ".join(known[: self.LISTED]) + (f", ... ({len(known)} in all)" if len(known) > self.LISTED else "")
        super().__init__(
            f"Unknown task {task!r}{where}. Loaded tasks: {shown or 'none'}. GET /v1/models lists them.",
            tasks=known[: self.LISTED],
        )

    def __str__(self) -> str:
        return self.message


class AdapterError(ServingError, ValueError):
    """An adapter cannot be served; the message names it and says what to do: 422."""

    status, error_type = 422, "invalid_adapter"


class ForbiddenPathError(ServingError):
    """An admin path outside the adapters directory: 403."""

    status, error_type = 403, "forbidden_path"


class MissingAdapterError(ServingError):
    """No adapter directory at an admin path: 404."""

    status, error_type = 404, "missing_adapter"


class UnauthorizedError(ServingError):
    """An admin request without the server's API key: 401."""

    status, error_type = 401, "unauthorized"


class OverloadedError(ServingError):
    """The queue, or the generation budget of tokens in flight, is full: 429 with `Retry-After`."""

    status, error_type, retry = 429, "overloaded", True
    retry_after_s: float | None = None  # the engine's estimate, when it has one (else the server's setting)


class DrainingError(ServingError, RuntimeError):
    """The server is shutting down (or not started) and takes no new work: 503 with `Retry-After`."""

    status, error_type, retry = 503, "unavailable", True


class StartingError(DrainingError):
    """The server is still starting: 503 with `Retry-After`."""


class TimedOutError(ServingError):
    """No result within the request timeout: 504."""

    status, error_type = 504, "timeout"
