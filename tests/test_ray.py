"""The Ray Serve app (`bitfit_peft.serving.ray_app`): a local Ray instance runs 2 replicas of a tiny BERT base with
adapters of different head sizes; concurrent HTTP requests for mixed tasks each get what `TaskStore.predict` gives for
that item alone, both replicas answer, and batches mix tasks. Skipped without the `ray` extra."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")

from serving_helpers import save_adapter, save_base, text  # noqa: E402

from bitfit_peft.serving import TaskStore  # noqa: E402
from bitfit_peft.serving.ray_app import build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

# task -> number of outputs (1 = regression)
HEADS = {"sent": 2, "nli": 3, "topic": 6, "sim": 1}
PAIRS = {"nli", "sim"}
WAVES, PER_WAVE, DEADLINE_S = 4, 32, 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """Status, JSON body and the replica that answered (the `x-bitfit-replica` header)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers["x-bitfit-replica"]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers["x-bitfit-replica"]


def _mixed_batches(url: str, replicas: set[str]) -> dict[str, float]:
    """bitfit_mixed_batches_total per replica, read from /metrics until every replica in `replicas` answered once
    (bounded: the proxy picks a replica per request)."""
    seen: dict[str, float] = {}
    for _ in range(40):
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            replica, body = response.headers["x-bitfit-replica"], response.read().decode()
        seen[replica] = sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith("bitfit_mixed_batches_total"))  # fmt: skip
        if replicas <= set(seen):
            break
    return seen


def _item(i: int) -> tuple[str, str | tuple[str, str]]:
    task = list(HEADS)[i % len(HEADS)]
    return task, ((text(2 * i), text(2 * i + 1)) if task in PAIRS else text(i))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TaskStore]]:
    root = tmp_path_factory.mktemp("ray")
    base = save_base(root / "base", "bert")
    for i, (task, n) in enumerate(HEADS.items()):
        save_adapter(base, root / "adapters" / task, num_labels=n, seed=i)
    port = _free_port()
    # address="local": always a fresh instance on this machine, never a cluster found through RAY_ADDRESS
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            str(base), str(root / "adapters"), replicas=2, num_cpus=0.5, threads=1, batch_wait_timeout_s=0.05
        )
        serve.run(app, route_prefix="/")
        # a decoder base beside it, as a second application: the same app serves generation and streaming
        decoder = save_base(root / "decoder", "gpt2")
        for i in range(2):
            save_adapter(decoder, root / "generators" / f"g{i}", seed=i)
        generator = build_app(str(decoder), str(root / "generators"), replicas=1, num_cpus=0.5, threads=1)
        serve.run(generator, name="gen", route_prefix="/gen")
        yield f"http://127.0.0.1:{port}", TaskStore.open(str(base), str(root / "adapters"))
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_mixed_concurrent_requests_like_the_store_alone(served: tuple[str, TaskStore]) -> None:
    url, store = served
    replicas: set[str] = set()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for wave in range(WAVES):
            items = [_item(wave * PER_WAVE + i) for i in range(PER_WAVE)]
            bodies = [{"task": task, "inputs": inputs} for task, inputs in items]
            answers = list(pool.map(lambda b: _post(f"{url}/v1/predict", b), bodies))
            for (task, inputs), (status, got, replica) in zip(items, answers, strict=True):
                assert status == 200, got
                want = store.predict([(task, inputs)])[0]
                assert got["task"] == task and got["label"] == want.label
                assert got["logits"] == pytest.approx(want.logits, abs=1e-5), task
                assert got["scores"] == pytest.approx(want.scores, abs=1e-5)
                assert (got["score"] is None) == (want.score is None)
                replicas.add(replica)
            if len(replicas) == 2 or time.monotonic() - start > DEADLINE_S:
                break
    assert len(replicas) == 2, f"one replica answered every request: {replicas}"
    mixed = _mixed_batches(url, replicas)
    assert sum(mixed.values()) > 0, f"no batch held more than one task: {mixed}"


def test_unknown_task_404_blank_input_422_too_long_413_unless_truncated_and_the_same_routes(
    served: tuple[str, TaskStore],
) -> None:
    url, store = served
    status, body, _ = _post(f"{url}/v1/predict", {"model": "nope", "inputs": "w1 w2"})
    assert status == 404 and "Unknown task 'nope'" in body["error"] and "sent" in body["tasks"]
    status, body, _ = _post(f"{url}/v1/predict", {"task": "sent", "inputs": "  "})
    assert status == 422 and body["detail"][0]["loc"][-1] == "inputs"
    long = text(0, n=store.max_length + 10)
    status, body, _ = _post(f"{url}/v1/predict", {"task": "sent", "inputs": long})
    assert status == 413 and f"more than --max-length {store.max_length}" in body["error"]
    status, body, _ = _post(f"{url}/v1/predict", {"task": "sent", "inputs": long, "truncate": True})
    assert status == 200 and body["logits"] == pytest.approx(store.predict([("sent", long)])[0].logits, abs=1e-5)
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        ids = [card["id"] for card in json.loads(response.read())["data"]]
    assert ids[0] == store.base_name and sorted(ids[1:]) == sorted(HEADS)
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as response:  # the same app as bitfit-peft serve
        assert {"/v1/predict/batch", "/v1/adapters", "/metrics", "/ready"} <= set(json.loads(response.read())["paths"])


def test_generation_and_streaming_through_the_same_app(served: tuple[str, TaskStore]) -> None:
    """A decoder replica answers OpenAI completions, streamed or not, equal to the engine's offline greedy output."""
    openai = pytest.importorskip("openai", reason="the test extra: pip install openai")
    from bitfit_peft.serving.engine import GenerationEngine, SamplingParams

    url, store = served
    root = Path(store.base_name).parent
    client = openai.OpenAI(base_url=f"{url}/gen/v1", api_key="unused", max_retries=0, timeout=60)
    local = TaskStore.open(str(root / "decoder"), str(root / "generators"))
    engine = GenerationEngine(local)
    engine.start()
    try:
        for i in range(4):
            task, prompt = f"g{i % 2}", text(20 + i)
            want = engine.submit(task, prompt, SamplingParams(max_tokens=6, temperature=0)).result(timeout=60)
            assert want.text.strip(), "the tiny decoder must write words for the comparison to mean anything"
            got = client.completions.create(model=task, prompt=prompt, max_tokens=6, temperature=0)
            assert (got.choices[0].text, got.usage.completion_tokens) == (want.text, want.completion_tokens)
            chunks = list(
                client.completions.create(model=task, prompt=prompt, max_tokens=6, temperature=0, stream=True)
            )
            assert "".join(c.choices[0].text for c in chunks) == want.text
            assert chunks[-1].choices[0].finish_reason == want.finish_reason
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="w1", max_tokens=2)
    finally:
        engine.close(30)
