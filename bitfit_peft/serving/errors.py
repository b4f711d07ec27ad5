"""The serving errors, as types: each says what went wrong, and its class line gives its HTTP status and `error_type`
(and whether the answer carries `Retry-After`), in this one place.

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

    def __init_subclass__(
        cls, status: int | None = None, error_type: str | None = None, retry: bool | None = None, **kw: Any
    ) -> None:
        """`class XError(ServingError, status=404, error_type="x")`: what the answer to it says; unset: the parent's."""
        super().__init_subclass__(**kw)
        cls.status = cls.status if status is None else status
        cls.error_type = cls.error_type if error_type is None else error_type
        cls.retry = cls.retry if retry is None else retry

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.error_type


class BadInputError(ServingError, ValueError, status=422, error_type="invalid_input"):
    """An input the model cannot take (empty text, wrong shape, bad sampling value)."""


class TooLongError(BadInputError, status=413, error_type="too_long"):
    """An input longer than the server's limit."""


class TooManyItemsError(BadInputError, status=413, error_type="too_many_items"):
    """More items in one request than the server takes."""


class WrongRouteError(BadInputError, status=400, error_type="wrong_route"):
    """A request this base cannot serve on this route (a task of another kind)."""


class UnknownTaskError(ServingError, KeyError, status=404, error_type="unknown_task"):
    """A task that is not loaded; the message lists (some of) the tasks that are."""

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


class AdapterError(ServingError, ValueError, status=422, error_type="invalid_adapter"):
    """An adapter cannot be served; the message names it and says what to do."""


class ForbiddenPathError(ServingError, status=403, error_type="forbidden_path"):
    """An admin path outside the adapters directory."""


class MissingAdapterError(ServingError, status=404, error_type="missing_adapter"):
    """No adapter directory at an admin path."""


class UnauthorizedError(ServingError, status=401, error_type="unauthorized"):
    """An admin request without the server's API key."""


class OverloadedError(ServingError, status=429, error_type="overloaded", retry=True):
    """The queue, or the generation budget of tokens in flight, is full."""

    retry_after_s: float | None = None  # the engine's estimate, when it has one (else the server's setting)


class DrainingError(ServingError, RuntimeError, status=503, error_type="unavailable", retry=True):
    """The server is shutting down (or not started) and takes no new work."""


class StartingError(DrainingError):
    """The server is still starting."""


class TimedOutError(ServingError, status=504, error_type="timeout"):
    """No result within the request timeout."""
