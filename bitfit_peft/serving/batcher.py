"""Cross-task dynamic micro-batching: one bounded queue for every task, one worker thread that owns the model.

Callers (HTTP handlers, a Ray actor, a benchmark loop) submit prediction items `(task, text | (text, text))` and
`GenerationRequest`s of any task into the same queue. The worker thread closes a batch when it holds
`max_batch_size` items or `max_wait_ms` after the batch's first item was queued, whichever comes first, then runs one
mixed `store.predict` for the batch's prediction items and one `store.generate` for its generation requests.

Results come back through `concurrent.futures.Future`s: threads wait on them with `.result()`, asyncio code awaits
them with `asyncio.wrap_future` (which hands the result to the event loop with `call_soon_threadsafe`), so the model
never runs on the event loop. If the store raises for a batch, each of its items is retried alone: a bad item fails
only itself, never its batch-mates. `close()` stops accepting new work and returns once every queued item is done.

>>> batcher = Batcher(store, max_batch_size=32, max_wait_ms=5, max_queue=1024)  # doctest: +SKIP
>>> batcher.start()  # doctest: +SKIP
>>> prediction = await batcher.predict("sst2", "a great movie")  # doctest: +SKIP
>>> batcher.close()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import DrainingError, OverloadedError, ServingError
from .store import EmbedItem, GenerationRequest, Prediction

__all__ = ["BatchStats", "BatchObserver", "Batcher", "PredictItem"]

logger = logging.getLogger(__name__)

PredictItem = tuple[str, str | tuple[str, str]] | tuple[str, str | tuple[str, str], bool]  # (task, inputs[, truncate])


@dataclass(frozen=True)
class BatchStats:
    """What one batch was: its size, distinct tasks, each item's wait in the queue, and the model time.

    Args:
        size: items run in the batch (cancelled items are dropped before the batch runs).
        tasks: distinct task names in the batch.
        queue_waits: seconds each item waited between `submit` and the start of its batch.
        seconds: wall time of the model calls for the batch (including any one-by-one retries).
        generations: how many of the items were generation requests.
        failed: how many items ended with an exception.
    """

    size: int
    tasks: int
    queue_waits: list[float]
    seconds: float
    generations: int = 0
    failed: int = 0


class BatchObserver(Protocol):
    """Receives the batcher's measurements (from the worker thread, and from `submit` for the depth)."""

    def on_batch(self, stats: BatchStats) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


@dataclass(eq=False)
class _Item:
    task: str
    work: Any  # PredictItem | GenerationRequest
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Cross-task dynamic micro-batcher over a `TaskStore` (see the module docstring).

    Args:
        store: anything with the `TaskStore` methods `predict(items)` and `generate(requests)`.
        max_batch_size: most items per batch (prediction and generation items together).
        max_wait_ms: how long a batch waits for more items after its first one was queued.
        max_queue: most items waiting at once; `submit` raises `OverloadedError` beyond it.
        observer: optional receiver of `BatchStats` and queue depths (e.g. Prometheus metrics).
    """

    def __init__(self, store: Any, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 observer: BatchObserver | None = None) -> None:  # fmt: skip
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}.")
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.observer = observer
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._closed = False
        self._busy = 0  # items taken by the worker and not settled yet
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Batcher.start() was already called; create a new Batcher to restart.")
            self._accepting = True
            self._thread = threading.Thread(target=self._run, name="bitfit-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting work, finish every queued and running item, stop the worker; True if it stopped in time."""
        with self._cond:
            self._accepting = False
            self._closed = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def aclose(self, timeout: float | None = None) -> bool:
        """`close()` without blocking the event loop."""
        return await asyncio.to_thread(self.close, timeout)

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes new work (started and not closing)."""
        return self._accepting

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Items waiting in the queue or running now."""
        with self._cond:
            return len(self._queue) + self._busy

    # -- submitting ------------------------------------------------------------------------------------------------
    def submit(self, works: Sequence[Any]) -> list[Future]:
        """Queue prediction items `(task, inputs)` and `GenerationRequest` objects, all or none; one future per work.

        Raises `DrainingError` when not accepting, `OverloadedError` when they do not all fit in the queue.
        """
        items = [_Item(w.task if isinstance(w, GenerationRequest) else w[0], w) for w in works]
        with self._cond:
            if not self._accepting:
                raise DrainingError("The server is shutting down (or not started) and takes no new requests.")
            if len(self._queue) + len(items) > self.max_queue:
                raise OverloadedError(
                    f"The queue is full ({len(self._queue)} of {self.max_queue} items waiting, {len(items)} "
                    "submitted): retry later, or start the server with a larger --max-queue."
                )
            self._queue.extend(items)
            depth = len(self._queue) + self._busy
            self._cond.notify()
        if self.observer is not None:
            self.observer.on_queue_depth(depth)
        return [item.future for item in items]

    async def run(self, works: Sequence[Any]) -> list[Any]:
        """Submit and await: a `Prediction` per item, a generated `str` per `GenerationRequest`, in order."""
        futures = self.submit(works)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    async def predict(self, task: str, inputs: str | tuple[str, str]) -> Prediction:
        return (await self.run([(task, inputs)]))[0]

    async def generate(self, request: GenerationRequest) -> str:
        return (await self.run([request]))[0]

    # -- the worker ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException as exc:  # a bug here must not kill the worker and hang every caller
                logger.exception("batch failed outside the model calls")
                for item in batch:
                    _fail(item.future, exc)
            finally:
                with self._cond:
                    self._busy -= len(batch)
                    depth = len(self._queue) + self._busy
                if self.observer is not None:
                    self.observer.on_queue_depth(depth)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            self._busy += len(batch)
        return batch

    def _execute(self, batch: list[_Item]) -> None:
        # An item whose caller went away (a cancelled future) is dropped before it costs a forward.
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        generates = [item for item in live if isinstance(item.work, GenerationRequest)]
        embeds = [item for item in live if isinstance(item.work, EmbedItem)]
        predicts = [item for item in live if not isinstance(item.work, (GenerationRequest, EmbedItem))]
        failed = 0
        for group, method in ((predicts, "predict_outcomes"), (embeds, "embed_outcomes"), (generates, "generate")):
            if group:
                failed += self._call(group, getattr(self.store, method))
        if self.observer is not None:
            self.observer.on_batch(
                BatchStats(
                    size=len(live),
                    tasks=len({item.task for item in live}),
                    queue_waits=[started - item.queued_at for item in live],
                    seconds=time.perf_counter() - started,
                    generations=len(generates),
                    failed=failed,
                )
            )

    @staticmethod
    def _call(items: list[_Item], fn: Callable[[list[Any]], list[Any]]) -> int:
        """One call for the group; if it raises, one call per item so that a bad item fails only itself. Returns how
        many items failed; an item's error that the store answers in its place (a `ServingError`) counts."""
        try:
            results = fn([item.work for item in items])
            if len(results) != len(items):
                raise RuntimeError(f"the store returned {len(results)} results for {len(items)} inputs")
        except Exception as exc:
            if len(items) == 1:
                _fail(items[0].future, exc)
                return 1
            logger.warning("a batch of %d failed (%s); retrying its items one by one", len(items), exc)
            # the same rules alone: a wrong count, or an error answered in the item's place, fail that item
            return sum(Batcher._call([item], fn) for item in items)
        failed = 0
        for item, result in zip(items, results, strict=True):  # `predict_outcomes` puts an item's error in its place
            if isinstance(result, ServingError):
                item.future.set_exception(result)
                failed += 1
            else:
                item.future.set_result(result)
        return failed


def _fail(future: Future, exc: BaseException) -> None:
    """Fail an item's future, unless it already has its answer (a bug after the results were set keeps them)."""
    if not future.done():
        future.set_exception(exc)
