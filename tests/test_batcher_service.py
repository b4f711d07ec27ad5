"""The batcher and the HTTP service in process, in front of a store that runs no model: every rule they own, fast.

`Batcher` (serving/batcher.py): argument checks, the all-or-none bounded queue, batches split by kind (predict,
embed, generate) in one pass, a store's per-item errors, the one-by-one retry, a store that answers the wrong count,
cancelled items, a bug outside the model calls, what the observer is told, and `close` / `aclose`. `Service`
(serving/service.py): the settings' checks, `run`'s timeout and per-item errors, the admin path check, and what
`start` wires up. The server tests (`test_server.py`) check the same parts behind HTTP with a real model; these run
in milliseconds, so mutmut can afford them for every mutant (docs/testing.md). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="pip install 'bitfit-peft[serve]'")
from bitfit_peft.serving.batcher import Batcher, BatchStats  # noqa: E402
from bitfit_peft.serving.errors import (  # noqa: E402
    BadInputError,
    DrainingError,
    ForbiddenPathError,
    MissingAdapterError,
    OverloadedError,
    StartingError,
    TimedOutError,
)
from bitfit_peft.serving.service import ServeSettings, Service  # noqa: E402
from bitfit_peft.serving.store import EmbedItem, GenerationRequest  # noqa: E402

WAIT_S = 30  # the bound on every wait: a broken batcher fails the test instead of hanging it


class FakeStore:
    """A `TaskStore` stand-in: answers `"<kind>:<task>:<input>"`, records each call, blocks while `gate` is clear,
    raises for a call holding an input "bad..." (naming it), answers a `BadInputError` in place of an input "err...",
    and answers one result too many for an input "extra"."""

    kind = "classifier"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.refused: dict[str, str] = {}

    def tasks(self) -> list[str]:
        return ["t0", "t1", "t2"]

    def _answer(self, kind: str, pairs: list[tuple[str, str]]) -> list[Any]:
        self.calls.append((kind, [x for _, x in pairs]))
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise RuntimeError("the gate never opened")
        bad = [x for _, x in pairs if x.startswith("bad")]
        if bad:
            raise ValueError(f"cannot run {bad[0]!r}")
        out: list[Any] = [
            BadInputError(f"refused {x}") if x.startswith("err") else f"{kind}:{t}:{x}" for t, x in pairs
        ]
        return out + ["one too many"] * any(x == "extra" for _, x in pairs)

    def predict_outcomes(self, items: list[tuple]) -> list[Any]:
        return self._answer("predict", [(item[0], str(item[1])) for item in items])

    def embed_outcomes(self, items: list[EmbedItem]) -> list[Any]:
        return self._answer("embed", [(item.task, item.inputs) for item in items])

    def generate(self, requests: list[GenerationRequest]) -> list[Any]:
        return self._answer("generate", [(r.task, r.prompt) for r in requests])


class Recorder:
    """A `BatchObserver` that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[BatchStats] = []
        self.depths: list[int] = []

    def on_batch(self, stats: BatchStats) -> None:
        self.batches.append(stats)

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


def started(store: Any, **kw: Any) -> Batcher:
    batcher = Batcher(store, **kw)
    batcher.start()
    return batcher


def outcome(future: Any) -> str:
    """A settled future's result, or its error as `Type: message`."""
    error = future.exception(WAIT_S)
    return f"{type(error).__name__}: {error}" if error is not None else future.result()


# -- Batcher ----------------------------------------------------------------------------------------------------------
def test_batcher_refuses_bad_sizes_and_a_second_start_and_takes_the_smallest_good_ones() -> None:
    for kw, name in (({"max_batch_size": 0}, "max_batch_size"), ({"max_queue": 0}, "max_queue")):
        with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
            Batcher(FakeStore(), **kw)
    with pytest.raises(ValueError, match="max_wait_ms must be 0 or more, got -1"):
        Batcher(FakeStore(), max_wait_ms=-1)
    defaults = Batcher(FakeStore())  # the documented defaults (benchmarks and the Ray app rely on some of them)
    assert (defaults.max_batch_size, defaults.max_wait, defaults.max_queue) == (32, 0.005, 1024)
    store = FakeStore()
    batcher = Batcher(store, max_batch_size=1, max_queue=1, max_wait_ms=0)
    assert not batcher.accepting and not batcher.alive
    with pytest.raises(DrainingError, match="not started"):  # 503: nothing runs the queue yet
        batcher.submit([("t0", "x")])
    assert batcher.close(WAIT_S)  # closing a batcher that never started returns at once
    batcher = started(store, max_batch_size=1, max_queue=1, max_wait_ms=0)
    assert batcher.accepting and batcher.alive
    # one named daemon thread: it shows in thread dumps, and a batcher never closed does not block the exit
    assert [t.daemon for t in threading.enumerate() if t.name == "bitfit-batcher"] == [True]
    with pytest.raises(RuntimeError, match="already called"):
        batcher.start()
    try:
        assert outcome(batcher.submit([("t0", "x")])[0]) == "predict:t0:x"
    finally:
        assert batcher.close(WAIT_S)
    assert not batcher.accepting and not batcher.alive


def test_the_queue_takes_a_request_whole_or_not_at_all_up_to_max_queue() -> None:
    store, seen = FakeStore(), Recorder()
    batcher = started(store, max_batch_size=1, max_queue=2, max_wait_ms=0, observer=seen)
    try:
        store.gate.clear()
        first = batcher.submit([("t0", "a")])
        assert store.entered.wait(WAIT_S)  # the worker holds "a": the queue is empty, depth 1
        assert batcher.depth == 1
        with pytest.raises(OverloadedError, match=r"\(0 of 2 items waiting, 3 submitted\).*--max-queue") as error:
            batcher.submit([("t1", "b"), ("t1", "c"), ("t1", "d")])  # 3 > 2: none of them is queued
        assert error.value.status == 429
        assert batcher.depth == 1
        queued = batcher.submit([("t1", "b"), ("t2", "c")])  # exactly max_queue waiting is allowed
        assert batcher.depth == 3 and seen.depths[-1] == 3
        with pytest.raises(OverloadedError, match=r"\(2 of 2 items waiting, 1 submitted\)"):
            batcher.submit([("t0", "e")])
        store.gate.set()
        assert [outcome(f) for f in first + queued] == ["predict:t0:a", "predict:t1:b", "predict:t2:c"]
    finally:
        store.gate.set()
        assert batcher.close(WAIT_S)
    assert [c for _, c in store.calls] == [["a"], ["b"], ["c"]]  # max_batch_size=1: one item per call
    assert seen.depths[:2] == [1, 3] and seen.depths[-1] == 0  # the submits' depths, then the last batch settled


def test_one_batch_runs_each_kind_once_and_answers_every_item_in_its_place() -> None:
    store, seen = FakeStore(), Recorder()
    batcher = started(store, max_batch_size=8, max_queue=8, max_wait_ms=60_000, observer=seen)
    try:
        works = [
            ("t0", "p1"),
            GenerationRequest(task="t1", prompt="g1"),
            EmbedItem("t2", "e1"),
            ("t1", ("p2", "pair"), True),
            EmbedItem("t0", "e2"),
            EmbedItem("t1", "e3"),
            ("t2", "err-1"),
            ("t0", "err-3"),
        ]
        before = time.perf_counter()
        futures = batcher.submit(works)  # a full batch closes at once, long before max_wait
        got = [outcome(f) for f in futures]
        window = time.perf_counter() - before  # the measurements below happened inside it
    finally:
        assert batcher.close(WAIT_S)
    assert got == [
        "predict:t0:p1",
        "generate:t1:g1",
        "embed:t2:e1",
        "predict:t1:('p2', 'pair')",
        "embed:t0:e2",
        "embed:t1:e3",
        "BadInputError: refused err-1",
        "BadInputError: refused err-3",
    ]
    assert store.calls == [
        ("predict", ["p1", "('p2', 'pair')", "err-1", "err-3"]),
        ("embed", ["e1", "e2", "e3"]),
        ("generate", ["g1"]),
    ]
    (stats,) = seen.batches
    assert (stats.size, stats.tasks, stats.generations, stats.failed) == (8, 3, 1, 2)
    assert len(stats.queue_waits) == 8 and all(0 <= w <= window for w in stats.queue_waits)
    assert 0 <= stats.seconds <= window


def test_a_batch_waits_for_items_queued_after_its_first_until_it_is_full() -> None:
    store = FakeStore()
    batcher = started(store, max_batch_size=2, max_queue=8, max_wait_ms=60_000)
    try:
        first = batcher.submit([("t0", "a")])
        assert not store.entered.wait(0.05)  # not run alone: the batch waits (up to a minute) for a second item
        second = batcher.submit([("t1", "b")])
        assert [outcome(f) for f in first + second] == ["predict:t0:a", "predict:t1:b"]
    finally:
        assert batcher.close(WAIT_S)
    assert store.calls == [("predict", ["a", "b"])]  # one batch, closed when full, long before max_wait


def test_a_failing_group_is_retried_item_by_item_and_a_lone_item_fails_once(caplog: pytest.LogCaptureFixture) -> None:
    store, seen = FakeStore(), Recorder()
    batcher = started(store, max_batch_size=4, max_queue=8, max_wait_ms=1, observer=seen)
    try:
        group = batcher.submit([("t0", "ok-1"), ("t1", "bad-1"), ("t2", "err-2"), ("t0", "ok-2")])
        got = [outcome(f) for f in group]
        lone = batcher.submit([GenerationRequest(task="t0", prompt="bad-g")])
        assert outcome(lone[0]) == "ValueError: cannot run 'bad-g'"
    finally:
        assert batcher.close(WAIT_S)
    assert got == [
        "predict:t0:ok-1",
        "ValueError: cannot run 'bad-1'",
        "BadInputError: refused err-2",
        "predict:t0:ok-2",
    ]
    assert [c for _, c in store.calls] == [["ok-1", "bad-1", "err-2", "ok-2"], ["ok-1"], ["bad-1"], ["err-2"], ["ok-2"], ["bad-g"]]  # fmt: skip
    assert [(b.size, b.failed) for b in seen.batches] == [(4, 2), (1, 1)]
    assert "a batch of 4 failed (cannot run 'bad-1'); retrying its items one by one" in caplog.text


def test_a_store_that_answers_the_wrong_count_fails_each_item_instead_of_mixing_answers() -> None:
    store = FakeStore()
    batcher = started(store, max_batch_size=2, max_queue=8, max_wait_ms=1)
    try:
        lone = batcher.submit([("t0", "extra")])  # a lone item: no retry, the error is its own
        assert outcome(lone[0]) == "RuntimeError: the store returned 2 results for 1 inputs"
        pair = batcher.submit([("t0", "extra"), ("t1", "fine")])  # retried one by one: the good item is answered
        assert outcome(pair[1]) == "predict:t1:fine"
        assert outcome(pair[0]) == "RuntimeError: the store returned 2 results for 1 inputs"  # alone: the same rule
    finally:
        assert batcher.close(WAIT_S)
    assert [c for _, c in store.calls] == [["extra"], ["extra", "fine"], ["extra"], ["fine"]]


def test_a_cancelled_item_is_dropped_before_the_forward_and_an_all_cancelled_batch_runs_nothing() -> None:
    store, seen = FakeStore(), Recorder()
    batcher = started(store, max_batch_size=2, max_queue=8, max_wait_ms=60_000, observer=seen)
    try:
        store.gate.clear()
        busy = batcher.submit([("t0", "a"), ("t0", "b")])
        assert store.entered.wait(WAIT_S)
        gone = batcher.submit([("t1", "c"), ("t1", "d")])
        kept = batcher.submit([("t2", "e"), ("t2", "f")])
        assert all(f.cancel() for f in gone) and kept[1].cancel()
        store.gate.set()
        assert [outcome(f) for f in busy + kept[:1]] == ["predict:t0:a", "predict:t0:b", "predict:t2:e"]
    finally:
        store.gate.set()
        assert batcher.close(WAIT_S)
    assert [c for _, c in store.calls] == [["a", "b"], ["e"]]
    assert [b.size for b in seen.batches] == [2, 1]  # the all-cancelled batch is not reported either


def test_a_bug_outside_the_model_calls_fails_its_batch_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Recorder):
        def on_batch(self, stats: BatchStats) -> None:
            super().on_batch(stats)
            if len(self.batches) == 1:
                raise KeyError("a bug in the observer")

    store, seen = FakeStore(), Broken()
    batcher = started(store, max_batch_size=2, max_queue=8, max_wait_ms=60_000, observer=seen)
    try:
        with caplog.at_level(logging.ERROR, logger="bitfit_peft.serving.batcher"):
            first = batcher.submit([("t0", "a"), GenerationRequest(task="t1", prompt="b")])
            # the results were set before the observer failed: they stand
            assert [outcome(f) for f in first] == ["predict:t0:a", "generate:t1:b"]
            after = batcher.submit([("t0", "c"), ("t1", "d")])
            assert [outcome(f) for f in after] == ["predict:t0:c", "predict:t1:d"]
        assert batcher.alive and batcher.depth == 0
    finally:
        assert batcher.close(WAIT_S)
    assert "batch failed outside the model calls" in caplog.text
    assert seen.depths[-1] == 0


def test_a_bug_before_the_results_fails_every_item_of_its_batch() -> None:
    class NoStore:
        """Lacks `predict_outcomes`: the `getattr` of the batch raises outside the store call."""

    batcher = started(NoStore(), max_batch_size=2, max_queue=8, max_wait_ms=60_000)
    try:
        futures = batcher.submit([("t0", "a"), ("t1", "b")])
        got = [outcome(f) for f in futures]
        assert batcher.alive
    finally:
        assert batcher.close(WAIT_S)
    assert all(g.startswith("AttributeError:") and "predict_outcomes" in g for g in got), got


def test_close_drains_the_queue_and_says_whether_the_worker_stopped_in_time() -> None:
    store = FakeStore()
    batcher = started(store, max_batch_size=1, max_queue=8, max_wait_ms=0)
    store.gate.clear()
    futures = batcher.submit([("t0", "a"), ("t1", "b")])
    assert store.entered.wait(WAIT_S)
    assert batcher.close(0.05) is False  # still held in the store: not stopped within the timeout
    assert asyncio.run(batcher.aclose(0.05)) is False  # the same, awaited
    assert not batcher.accepting and batcher.alive
    with pytest.raises(DrainingError, match="shutting down") as error:
        batcher.submit([("t0", "c")])
    assert error.value.status == 503
    store.gate.set()
    assert asyncio.run(batcher.aclose(WAIT_S)) is True
    assert [outcome(f) for f in futures] == ["predict:t0:a", "predict:t1:b"]  # the queued item ran before the stop
    assert not batcher.alive


def test_the_async_helpers_await_one_answer_each() -> None:
    store = FakeStore()
    batcher = started(store, max_batch_size=4, max_queue=8, max_wait_ms=1)

    async def calls() -> list[Any]:
        return [
            await batcher.predict("t0", "x"),
            await batcher.generate(GenerationRequest(task="t1", prompt="y")),
            await batcher.run([("t2", "z"), EmbedItem("t0", "w")]),
        ]

    try:
        got = asyncio.run(asyncio.wait_for(calls(), WAIT_S))
    finally:
        assert batcher.close(WAIT_S)
    assert got == ["predict:t0:x", "generate:t1:y", ["predict:t2:z", "embed:t0:w"]]


# -- Service ----------------------------------------------------------------------------------------------------------
def settings(adapters: Path, **over: Any) -> ServeSettings:
    return ServeSettings(base="no-base", adapters=str(adapters), **over)


@pytest.mark.parametrize(
    "name",
    ["max_batch_size", "max_queue", "max_length", "max_items_per_request", "max_new_tokens", "max_tokens_in_flight",
     "max_running", "prefill_chunk"],
)  # fmt: skip
def test_settings_refuse_a_size_below_one_and_take_one(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be at least 1, got 0.$"):
        settings(tmp_path, **{name: 0})
    assert getattr(settings(tmp_path, **{name: 1}), name) == 1


def test_settings_refuse_bad_waits_costs_and_an_empty_key(tmp_path: Path) -> None:
    for over in ({"max_wait_ms": -0.5}, {"request_timeout_s": 0}, {"request_timeout_s": -1}):
        with pytest.raises(ValueError, match="max_wait_ms must be >= 0 and request_timeout_s > 0"):
            settings(tmp_path, **over)
    assert settings(tmp_path, max_wait_ms=0, request_timeout_s=0.001).max_wait_ms == 0
    with pytest.raises(ValueError, match="forward_cost_tokens must be a number of tokens >= 0"):
        settings(tmp_path, forward_cost_tokens=-1.0)
    assert settings(tmp_path, forward_cost_tokens=0.0).forward_cost_tokens == 0.0
    with pytest.raises(ValueError, match="api_key is empty"):
        settings(tmp_path, api_key="")
    assert settings(tmp_path, api_key="k").api_key == "k"


def run_service(svc: Service, works: list[Any]) -> list[Any]:
    return asyncio.run(asyncio.wait_for(svc.run(works), WAIT_S))


def test_service_start_wires_the_batcher_from_the_settings_and_close_drains_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore()
    store.refused = {"t9": "another base"}
    svc = Service(settings(tmp_path, max_batch_size=3, max_wait_ms=7, max_queue=5, drain_timeout_s=WAIT_S), store)  # type: ignore[arg-type]
    assert svc.kind == "classifier" and svc.worker is None
    with pytest.raises(StartingError, match="starting") as error:  # before start: 503, retry
        run_service(svc, [("t0", "a")])
    assert error.value.status == 503
    with caplog.at_level(logging.WARNING, logger="bitfit_peft.serving.service"):
        asyncio.run(svc.start())
    assert "adapter 't9' is not served: another base" in caplog.text
    batcher = svc.batcher
    assert batcher is not None and svc.worker is batcher and batcher.alive
    assert (batcher.max_batch_size, batcher.max_wait, batcher.max_queue) == (3, 0.007, 5)
    assert batcher.observer is svc.metrics
    body = svc.metrics.render()[0].decode()
    assert "bitfit_resident_adapters 3.0" in body  # the store's three tasks
    assert run_service(svc, [("t0", "a"), ("t1", "b")]) == ["predict:t0:a", "predict:t1:b"]
    store.gate.clear()
    held = batcher.submit([("t0", "slow")])
    assert store.entered.wait(WAIT_S)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        closer = pool.submit(asyncio.run, svc.close())
        for _ in range(1000):  # bounded: until close has stopped the intake
            if not batcher.accepting:
                break
            concurrent.futures.wait([closer], 0.01)
        concurrent.futures.wait([closer], 0.2)
        assert not closer.done() and not held[0].done()  # close waits (up to drain_timeout_s) for the held item
        store.gate.set()
        assert closer.result(WAIT_S) is None  # and raises nothing (no engine to close on a classifier base)
    assert not batcher.alive  # drained, then the worker stopped
    assert outcome(held[0]) == "predict:t0:slow"


def test_service_run_times_out_with_504_and_names_the_failing_item(tmp_path: Path) -> None:
    store = FakeStore()
    svc = Service(settings(tmp_path), store, kind="classifier")  # type: ignore[arg-type]
    asyncio.run(svc.start())
    try:
        with pytest.raises(BadInputError, match=r"^refused err-1 \(items\[1\]\)$"):
            run_service(svc, [("t0", "a"), ("t1", "err-1")])
        with pytest.raises(BadInputError, match=r"^refused err-2$"):  # a lone item: no index
            run_service(svc, [("t0", "err-2")])
        with pytest.raises(ValueError, match=r"^cannot run 'bad-1'$"):  # not a ServingError: left as it is
            run_service(svc, [("t0", "a"), ("t1", "bad-1")])
        store.gate.clear()
        svc.settings = settings(tmp_path, request_timeout_s=0.1)  # the same batcher, a short timeout
        with pytest.raises(TimedOutError, match=r"No result within 0.1 s: retry, or raise --request-timeout") as e:
            run_service(svc, [("t0", "slow")])
        assert e.value.status == 504
    finally:
        store.gate.set()
        assert svc.batcher is not None and svc.batcher.close(WAIT_S)


def test_resolve_adapter_path_keeps_admin_paths_inside_the_adapters_directory(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "adapters-x").mkdir()
    os.symlink(tmp_path / "adapters-x", root / "out", target_is_directory=True)
    (root / "file").write_text("not a directory")
    svc = Service(settings(root), FakeStore())  # type: ignore[arg-type]
    real = os.path.realpath(root)
    assert svc.resolve_adapter_path("a") == os.path.join(real, "a")
    assert svc.resolve_adapter_path(str(root / "a" / "b")) == os.path.join(real, "a", "b")
    assert svc.resolve_adapter_path("a/../a/b") == os.path.join(real, "a", "b")
    for path in (".", str(root), "..", "../adapters-x", str(tmp_path / "adapters-x"), "out", "a/../../adapters-x"):
        with pytest.raises(ForbiddenPathError, match="is outside the adapters directory") as error:
            svc.resolve_adapter_path(path)
        assert error.value.status == 403, path
    with pytest.raises(ForbiddenPathError, match="NUL character"):
        svc.resolve_adapter_path("a\x00b")
    for path in ("missing", "file", str(root / "missing")):
        with pytest.raises(MissingAdapterError, match=f"No adapter directory at '{path}'") as missing:
            svc.resolve_adapter_path(path)
        assert missing.value.status == 404


class FakeWorker:
    """Stands in for the batcher or the generation engine: records how it was built, started and closed."""

    made: list[FakeWorker] = []

    def __init__(self, store: Any, **kw: Any) -> None:
        self.store, self.kw, self.started, self.closed = store, kw, False, []
        FakeWorker.made.append(self)

    def start(self) -> None:
        self.started = True

    def close(self, timeout: float | None = None) -> bool:
        self.closed.append(timeout)
        return True


def test_service_without_a_store_opens_one_from_the_settings_and_a_decoder_base_runs_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitfit_peft.serving import engine
    from bitfit_peft.serving.store import TaskStore

    opened: list[dict[str, Any]] = []
    asked: list[tuple[Any, ...]] = []

    def fake_open(**kw: Any) -> FakeStore:
        opened.append(kw)
        store = FakeStore()
        del store.refused  # a store may have no `refused` at all
        return store

    monkeypatch.setattr(TaskStore, "open", fake_open)
    monkeypatch.setattr(TaskStore, "kind_of", lambda *args: asked.append(args) or "generator")
    monkeypatch.setattr(engine, "GenerationEngine", FakeWorker)
    FakeWorker.made.clear()
    over = dict(dtype="bfloat16", device="meta", max_length=40, forward_cost_tokens=7.0, max_tokens_in_flight=99,
                max_running=5, prefill_chunk=11, drain_timeout_s=3.5)  # fmt: skip
    s = settings(tmp_path, **over)
    svc = Service(s, None)
    assert svc.kind == "generator" and asked == [("no-base", str(tmp_path))]  # read from the adapters' configs
    asyncio.run(svc.start())
    assert opened == [dict(base="no-base", adapters=str(tmp_path), dtype="bfloat16", device="meta", max_length=40,
                           forward_cost_tokens=7.0)]  # fmt: skip
    (made,) = FakeWorker.made
    assert made.store is svc.store and made.started and svc.worker is made and svc.batcher is None
    assert made.kw == dict(max_tokens_in_flight=99, max_running=5, prefill_chunk=11, max_prompt_tokens=40,
                           observer=svc.metrics)  # fmt: skip
    with pytest.raises(StartingError):  # a decoder base has no batcher: the predict routes are not served
        run_service(svc, [("t0", "a")])
    asyncio.run(svc.close())
    assert made.closed == [3.5]  # the engine drains for drain_timeout_s, no longer


def test_service_close_gives_each_worker_the_drain_timeout(tmp_path: Path) -> None:
    svc = Service(settings(tmp_path, drain_timeout_s=2.5), FakeStore(), kind="classifier")  # type: ignore[arg-type]
    asyncio.run(svc.close())  # nothing started: nothing to close
    svc.batcher = FakeWorker(None)  # type: ignore[assignment]
    asyncio.run(svc.close())
    assert svc.batcher.closed == [2.5]  # type: ignore[attr-defined]
