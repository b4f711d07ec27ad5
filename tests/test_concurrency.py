"""Mixed-task batches under concurrency: many threads, tasks with different head structures, adapters loaded,
deleted and hotswapped while other threads infer. Every row must equal its single-task answer.

Each test is bounded: a fixed number of calls per thread and a join timeout.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from bitfit_peft import BASE, BitFitConfig, hotswap_adapter
from bitfit_peft.routing import InFlight, MixedBatch, Routing, RWLock, mixed_batch

pytestmark = pytest.mark.usefixtures("single_thread")

THREADS = 8
CALLS = 50
JOIN_TIMEOUT_S = 120
TASKS = ["t0", "t1", "t2", "t3"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)


def _classifier(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "bert":  # Linear head on the pooler
        return transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3)).eval()
    config = transformers.RobertaConfig(**TINY, num_labels=3, max_position_embeddings=40, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config).eval()  # dense + out_proj head


def _with_tasks(base: transformers.PreTrainedModel) -> PeftModel:
    """Four adapters with random deltas, each with its own (perturbed) copy of the classifier head."""
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False), adapter_name=TASKS[0])
    for name in TASKS[1:]:
        model.add_adapter(name, BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
    return model.eval()


def _inputs(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 99, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _single_task(model: PeftModel, inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Each task's logits for every example, run with that task alone (set_adapter, no mixed routing)."""
    out = {}
    with torch.no_grad():
        for name in names:
            if name == BASE:
                with model.disable_adapter():
                    out[name] = model(**inputs).logits
            else:
                model.set_adapter(name)
                out[name] = model(**inputs).logits
    return out


def _hammer(call: Callable[[random.Random], list[str]], threads: int = THREADS) -> list[str]:
    """Run `call` CALLS times in each of `threads` threads; collect the problems each call reports."""
    problems: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(CALLS):
            try:
                found = call(rng)
            except Exception as err:  # every exception is a failure of the contract
                found = [f"{type(err).__name__}: {err}"]
            if found:
                with lock:
                    problems.extend(found)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in pool), "worker threads did not finish in time"
    return problems


def _mixed_call(
    model: PeftModel, inputs: dict[str, torch.Tensor], choices: list[str], expected: Callable[[str, int], list]
) -> Callable[[random.Random], list[str]]:
    n = inputs["input_ids"].shape[0]

    def call(rng: random.Random) -> list[str]:
        rows = sorted(rng.sample(range(n), rng.randint(1, n)))
        names = [rng.choice(choices) for _ in rows]
        batch = {k: v[rows] for k, v in inputs.items()}
        with torch.no_grad():
            got = model(**batch, adapter_names=names).logits
        bad = []
        for j, (row, name) in enumerate(zip(rows, names, strict=True)):
            if not any(torch.allclose(got[j], want, atol=1e-5) for want in expected(name, row)):
                bad.append(f"row {row} of task {name}: {got[j].tolist()}")
        return bad

    return call


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_threads_mixing_tasks_with_their_own_heads_get_their_single_task_rows(kind: str) -> None:
    model = _with_tasks(_classifier(kind))
    inputs = _inputs()
    ref = _single_task(model, inputs, [*TASKS, BASE])
    assert len({tuple(v.flatten().tolist()) for v in ref.values()}) == 5, "tasks must give different outputs"
    call = _mixed_call(model, inputs, [*TASKS, BASE], lambda name, row: [ref[name][row]])
    assert _hammer(call) == []


def test_hotswap_load_and_delete_during_traffic(tmp_path: Path) -> None:
    """A writer hotswaps t0 between two value sets and loads/deletes another adapter while 8 threads infer: each row
    of t0 equals one of the two versions entirely (never a mix of layers), every other row its single-task answer,
    and no call raises."""
    model = _with_tasks(_classifier("roberta"))
    inputs = _inputs()
    model.save_pretrained(str(tmp_path / "v1"), selected_adapters=["t0"])
    ref = _single_task(model, inputs, [*TASKS, BASE])
    with torch.no_grad():  # a second version of t0: other deltas and another head
        for name, param in model.named_parameters():
            if name.endswith(".t0") or ".modules_to_save.t0." in name:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "v2"), selected_adapters=["t0"])
    ref_v2 = _single_task(model, inputs, ["t0"])["t0"]
    hotswap_adapter(model, str(tmp_path / "v1" / "t0"), adapter_name="t0")
    model.save_pretrained(str(tmp_path / "extra"), selected_adapters=["t1"])
    model.eval()

    stop = threading.Event()
    writer_errors: list[str] = []
    swaps = [0]

    def writer() -> None:
        version = 0
        while not stop.is_set() and swaps[0] < 400:
            try:
                version = 1 - version
                hotswap_adapter(model, str(tmp_path / ("v2" if version else "v1") / "t0"), adapter_name="t0")
                if swaps[0] % 5 == 0:
                    model.load_adapter(str(tmp_path / "extra" / "t1"), adapter_name="extra")
                    model.delete_adapter("extra")
                swaps[0] += 1
            except Exception as err:
                writer_errors.append(f"{type(err).__name__}: {err}")
                return

    def expected(name: str, row: int) -> list[torch.Tensor]:
        return [ref[name][row], ref_v2[row]] if name == "t0" else [ref[name][row]]

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        problems = _hammer(_mixed_call(model, inputs, [*TASKS, BASE], expected))
    finally:
        stop.set()
        thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive()
    assert writer_errors == []
    assert swaps[0] > 5, "the writer should have swapped during the traffic"
    assert problems == []
    assert "extra" not in model.peft_config


def test_threads_mixing_tasks_in_generate() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64)
    model = get_peft_model(
        transformers.GPT2LMHeadModel(config).eval(), BitFitConfig(init_weights=False), adapter_name=TASKS[0]
    )
    for name in TASKS[1:]:
        model.add_adapter(name, BitFitConfig(init_weights=False))
    model.eval()
    prompts = torch.randint(3, 99, (6, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = {}
    with torch.no_grad():
        for name in [*TASKS, BASE]:
            if name == BASE:
                with model.disable_adapter():
                    ref[name] = model.generate(input_ids=prompts, **kw)
            else:
                model.set_adapter(name)
                ref[name] = model.generate(input_ids=prompts, **kw)
    assert len({tuple(v.flatten().tolist()) for v in ref.values()}) == 5

    def call(rng: random.Random) -> list[str]:
        rows = sorted(rng.sample(range(6), rng.randint(1, 6)))
        names = [rng.choice([*TASKS, BASE]) for _ in rows]
        with torch.no_grad():
            got = model.generate(input_ids=prompts[rows], adapter_names=names, **kw)
        return [
            f"row {r} task {n}"
            for j, (r, n) in enumerate(zip(rows, names, strict=True))
            if not torch.equal(got[j], ref[n][r])
        ]

    assert _hammer(call) == []


def test_rwlock_writer_waits_for_readers_and_excludes_them() -> None:
    """The lock the contract rests on: while a writer holds it no reader runs, and the writer waits for readers."""
    lock = RWLock()
    inside = {"readers": 0, "writers": 0}
    overlaps: list[str] = []
    guard = threading.Lock()

    def reader() -> None:
        for _ in range(200):
            with lock.read():
                with guard:
                    inside["readers"] += 1
                    if inside["writers"]:
                        overlaps.append("reader during writer")
                with guard:
                    inside["readers"] -= 1

    def writer() -> None:
        for _ in range(100):
            with lock.write():
                with guard:
                    inside["writers"] += 1
                    if inside["readers"] or inside["writers"] > 1:
                        overlaps.append("writer during reader/writer")
                with guard:
                    inside["writers"] -= 1

    pool = [threading.Thread(target=reader) for _ in range(6)] + [threading.Thread(target=writer) for _ in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in pool)
    assert overlaps == []


def test_adapter_change_inside_a_forward_call_is_refused() -> None:
    lock = RWLock()
    with lock.read(), pytest.raises(RuntimeError, match="change adapters between calls"), lock.write():
        pass


def test_rwlock_holds_says_whether_this_thread_reads_or_writes() -> None:
    """`holds()` lets a nested call in the same thread reuse its snapshot instead of deadlocking on a rebuild."""
    lock = RWLock()
    seen: list[bool] = []
    other = threading.Thread(target=lambda: seen.append(lock.holds()))
    with lock.read():
        assert lock.holds()
        other.start()
        other.join(JOIN_TIMEOUT_S)
    assert seen == [False] and not lock.holds()
    with lock.write():
        with lock.write():  # re-entrant: the inner exit must not release the outer hold
            pass
        assert lock.holds()
    assert not lock.holds()


def test_in_flight_counts_the_running_mixed_calls() -> None:
    """Compiled layers read `InFlight.count` (not the context variable) to notice a mixed call, nested or not."""
    before = InFlight.count
    batch = MixedBatch(["a"], Routing(slots={"a": 1}))
    with mixed_batch(batch):
        assert InFlight.count == before + 1
        with mixed_batch(batch):
            assert InFlight.count == before + 2
        assert InFlight.count == before + 1
    assert InFlight.count == before


def test_rwlock_new_readers_wait_behind_a_waiting_writer() -> None:
    """Writer preference: while a reader holds the lock and a writer waits, a new reader waits until the writer is
    done (a steady stream of requests cannot starve a load)."""
    lock = RWLock()
    order: list[str] = []
    writer_started, reader_started, reader_in = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        writer_started.set()
        with lock.write():
            order.append("writer")

    def reader() -> None:
        reader_started.set()
        with lock.read():
            order.append("reader")
            reader_in.set()

    lock.acquire_read()
    threads = [threading.Thread(target=writer, daemon=True)]
    threads[0].start()
    assert writer_started.wait(JOIN_TIMEOUT_S)
    time.sleep(0.3)  # let the writer reach its wait (it cannot get in: this thread reads)
    threads.append(threading.Thread(target=reader, daemon=True))
    threads[1].start()
    assert reader_started.wait(JOIN_TIMEOUT_S)
    got_in = reader_in.wait(0.5)  # without writer preference the new reader joins the holding one at once
    lock.release_read()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    assert not got_in and order == ["writer", "reader"]


class _RecordingStore:
    """A stand-in for `TaskStore` in front of a `Batcher`: records each batch of texts, blocks while `gate` is clear,
    and fails a batch that holds texts starting with "bad" with an error naming the first one."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def predict_outcomes(self, items: list[tuple]) -> list[str]:
        texts = [str(item[1]) for item in items]
        self.batches.append(texts)
        self.entered.set()
        if not self.gate.wait(JOIN_TIMEOUT_S):
            raise RuntimeError("the gate never opened")
        bad = [t for t in texts if t.startswith("bad")]
        if bad:
            raise ValueError(f"cannot predict {bad[0]!r}")
        return [f"ok {t}" for t in texts]

    predict = predict_outcomes


def test_batch_deadline_counts_from_the_first_queued_item() -> None:
    """An item that waited longer than max_wait while the worker was busy runs as soon as the worker is free; a
    deadline counted from when the worker looks would hold it another max_wait and let a later item join it."""
    from bitfit_peft.serving.batcher import Batcher

    store = _RecordingStore()
    batcher = Batcher(store, max_batch_size=2, max_wait_ms=2000, max_queue=8)
    batcher.start()
    try:
        store.gate.clear()
        busy = batcher.submit([("t", "a1"), ("t", "a2")])  # a full batch: runs at once, and blocks in the store
        assert store.entered.wait(JOIN_TIMEOUT_S)
        late = batcher.submit([("t", "b")])
        time.sleep(2.5)  # b has now waited longer than max_wait, behind the busy worker
        store.gate.set()
        assert [f.result(JOIN_TIMEOUT_S) for f in busy] == ["ok a1", "ok a2"]
        time.sleep(0.5)  # the worker takes b at once; a worker still waiting for b's batch to fill would take c too
        later = batcher.submit([("t", "c")])
        assert late[0].result(JOIN_TIMEOUT_S) == "ok b" and later[0].result(JOIN_TIMEOUT_S) == "ok c"
    finally:
        assert batcher.close(JOIN_TIMEOUT_S)
    assert store.batches == [["a1", "a2"], ["b"], ["c"]]


def test_one_by_one_retry_gives_each_failing_item_its_own_error() -> None:
    from bitfit_peft.serving.batcher import Batcher

    store = _RecordingStore()
    batcher = Batcher(store, max_batch_size=4, max_wait_ms=5, max_queue=8)
    batcher.start()
    try:
        futures = batcher.submit([("t", "good"), ("t", "bad-1"), ("t", "bad-2"), ("t", "fine")])
        outcomes = []
        for future in futures:
            error = future.exception(JOIN_TIMEOUT_S)
            outcomes.append(str(error) if error else future.result())
    finally:
        assert batcher.close(JOIN_TIMEOUT_S)
    assert store.batches[0] == ["good", "bad-1", "bad-2", "fine"]  # one batch, then each item alone
    assert outcomes == ["ok good", "cannot predict 'bad-1'", "cannot predict 'bad-2'", "ok fine"]
