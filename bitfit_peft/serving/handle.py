"""`GenerationHandle`: the caller's side of one generation request, usable from threads and from asyncio.

The engine's thread publishes text deltas and the end (a `Completion` or an error) into the handle; a thread
blocks on `result`, a coroutine awaits `wait` or iterates `stream`. Wake-ups reach an event loop through
`call_soon_threadsafe`, so the engine never touches a loop's state from its own thread. `Row` is the engine's
side of the same request (its tokens, KV slots and progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from .errors import TimedOutError
from .sampling import Completion, SamplingParams, TextTracker

__all__ = ["GenerationHandle", "Row"]


class GenerationHandle:
    """One submitted request: its text deltas as they become final, then its `Completion` or its error.

    Args:
        cancel (`Callable[[GenerationHandle], None]`): asks the engine to drop the request.
    """

    def __init__(self, cancel: Callable[[GenerationHandle], None]) -> None:
        self._cancel = cancel
        self._cond = threading.Condition()
        self._deltas: list[str] = []
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self._done = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False

    # ------------------------------------------------------------------ engine side
    def _publish(self, delta: str = "", result: Completion | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._done:
                return
            if delta:
                self._deltas.append(delta)
            if result is not None or error is not None:
                self._result, self._error, self._done = result, error, True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, event in wakers:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting there any more
                loop.call_soon_threadsafe(event.set)

    @property
    def done(self) -> bool:
        return self._done

    # ------------------------------------------------------------------ caller side
    def cancel(self) -> None:
        """Drop the request: it leaves the batch at the next step and its tokens in flight are freed."""
        self.cancelled = True
        if not self._done:
            self._cancel(self)

    def _outcome(self) -> Completion:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; its `Completion`, or raise its error (`TimedOutError` after `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimedOutError(f"No generation result within {timeout} s.")
            return self._outcome()

    async def wait(self) -> Completion:
        """Await the request's `Completion` (or its error)."""
        async for _ in self.stream(cancel_on_exit=False):
            pass
        return self._outcome()

    async def stream(self, cancel_on_exit: bool = True) -> AsyncIterator[str]:
        """The text deltas as they become final; raises the request's error, if any, after the deltas sent before
        it. Leaving the iteration early (a client that disconnects) cancels the request (`cancel_on_exit`)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._wakers.append((loop, event))
        sent = 0
        try:
            while True:
                event.clear()
                with self._cond:
                    deltas, done = self._deltas[sent:], self._done
                sent += len(deltas)
                for delta in deltas:
                    yield delta
                if done:
                    break
                if not deltas:
                    await event.wait()
            self._outcome()
        finally:
            with self._cond:
                self._wakers.remove((loop, event))
            if cancel_on_exit and not self._done:
                self.cancel()


@dataclass(eq=False)
class Row:
    """One request admitted by the engine: its prompt ids, KV slots, progress and output (engine-internal)."""

    task: str
    params: SamplingParams
    handle: GenerationHandle
    prompt: list[int]
    slots: torch.Tensor
    tracker: TextTracker
    generator: torch.Generator | None
    submitted: float
    key: int = field(default_factory=itertools.count().__next__)
    prefilled: int = 0
    out: list[int] = field(default_factory=list)
    first_token: float | None = None
