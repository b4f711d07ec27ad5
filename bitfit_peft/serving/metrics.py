"""Prometheus metrics of one server: requests and latency by task, queue, batches, resident adapters, adapter loads.

Every app gets its own `CollectorRegistry` (never the process-global one), so tests and benchmarks can run several
servers in one process. The `task` label is bounded: the first `max_task_labels` task names that are served get their
own label value, later ones are counted under `other`; requests for unknown tasks are counted under `unknown`, and
mixed-task requests under `mixed`, so a client sending arbitrary names cannot grow the label set.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batcher import BatchStats

__all__ = ["MIXED", "OTHER", "UNKNOWN", "MetricsMiddleware", "ServerMetrics", "TaskLabels"]

OTHER, UNKNOWN, MIXED = "other", "unknown", "mixed"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TaskLabels:
    """Maps task names to a bounded set of label values: the first `limit` names seen keep theirs, then `other`.

    >>> labels = TaskLabels(limit=1)
    >>> labels("sst2"), labels("trec"), labels("sst2")
    ('sst2', 'other', 'sst2')
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"the task label limit must be 0 or more, got {limit}.")
        self.limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> str:
        if task in self._names:
            return task
        with self._lock:
            if len(self._names) < self.limit:
                self._names.add(task)
                return task
        return OTHER


class ServerMetrics:
    """The server's Prometheus metrics in their own registry; also the batcher's `BatchObserver`.

    Args:
        max_task_labels: how many task names get their own `task` label value (see the module docstring).
    """

    def __init__(self, max_task_labels: int = 64) -> None:
        self.registry = CollectorRegistry()
        self.task_label = TaskLabels(max_task_labels)
        r = self.registry
        self.requests = Counter(
            "bitfit_requests", "HTTP requests by route, task and status code.", ["route", "task", "code"], registry=r
        )
        self.latency = Histogram(
            "bitfit_request_seconds",
            "Time from the request's arrival to its response, by route and task.",
            ["route", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("bitfit_items", "Items predicted or generated, by task.", ["task"], registry=r)
        self.queue_wait = Histogram(
            "bitfit_queue_wait_seconds", "Time an item waits in the queue before its batch runs.", buckets=LATENCY_BUCKETS, registry=r
        )  # fmt: skip
        self.queue_depth = Gauge("bitfit_queue_depth", "Items queued or running now.", registry=r)
        self.batch_size = Histogram("bitfit_batch_size", "Items per batch.", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tasks = Histogram(
            "bitfit_batch_tasks", "Distinct tasks per batch (above 1: a mixed-task batch).", buckets=SIZE_BUCKETS, registry=r
        )  # fmt: skip
        self.mixed_batches = Counter("bitfit_mixed_batches", "Batches that held more than one task.", registry=r)
        self.batch_seconds = Histogram(
            "bitfit_batch_seconds", "Model time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_failures = Counter("bitfit_batch_item_failures", "Items whose model call raised.", registry=r)
        self.resident = Gauge("bitfit_resident_adapters", "Adapters (tasks) loaded now.", registry=r)
        self.first_token = Histogram("bitfit_time_to_first_token_seconds", "From submit to a request's first token.", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.generated_tokens = Counter("bitfit_generated_tokens", "Tokens generated (finished requests).", registry=r)
        self.adapter_ops = Histogram(
            "bitfit_adapter_operation_seconds",
            "Duration of adapter loads, hotswaps and unloads done through the admin routes.",
            ["operation"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )

    # BatchObserver
    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tasks.observe(stats.tasks)
        if stats.tasks > 1:
            self.mixed_batches.inc()
        self.batch_seconds.observe(stats.seconds)
        for wait in stats.queue_waits:
            self.queue_wait.observe(wait)
        if stats.failed:
            self.batch_failures.inc(stats.failed)

    # GenerationObserver (serving.engine): one decode step is one batch; a finished request is one item
    def on_generation(self, event: str, data: dict[str, Any]) -> None:
        if event == "step" and data["rows"]:
            self.batch_size.observe(data["rows"])
            self.batch_tasks.observe(data["tasks"])
            if data["tasks"] > 1:
                self.mixed_batches.inc()
            self.batch_seconds.observe(data["seconds"])
        elif event == "first_token":
            self.first_token.observe(data["seconds"])
        elif event == "finish":
            self.items.labels(task=self.task_label(data["task"])).inc()
            self.generated_tokens.inc(data["completion_tokens"])

    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_request(self, route: str, task: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, task=task, code=str(code)).inc()
        self.latency.labels(route=route, task=task).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: counts and times every request of an `inference`-tagged route by route, task and status.

    The route sets its task's bounded label in `request.state.task` (requests that fail validation before that
    count as `unknown`); other routes (health, listing, admin) are not counted. One place for request metrics,
    so routes carry no timing code. A streaming answer is timed to its last byte.
    """

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            if route is not None and "inference" in (getattr(route, "tags", None) or ()):
                task = (scope.get("state") or {}).get("task", UNKNOWN)
                self.metrics.observe_request(route.path, task, status[0], time.perf_counter() - started)
