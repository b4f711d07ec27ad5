"""The serving core: `TaskStore` opens a base and a directory of adapters, serves tasks with different heads in one
mixed forward, refuses adapters it cannot serve, and adds/replaces/removes tasks while other threads predict."""

from __future__ import annotations

import math
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from serving_helpers import base_model, offline, save_adapter, save_base, text

from bitfit_peft import BitFitConfig
from bitfit_peft.constants import BASE
from bitfit_peft.serving import AdapterError, GenerationRequest, TaskStore, UnknownTaskError
from bitfit_peft.serving.chunks import plan_chunks
from bitfit_peft.serving.errors import TooLongError

pytestmark = pytest.mark.usefixtures("single_thread")

# task -> number of outputs (1 = regression)
HEADS = {"sent": 2, "topic": 6, "sim": 1}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served")
    base = save_base(root / "base", "bert")
    for i, (task, n) in enumerate(HEADS.items()):
        labels = ["neg", "pos"] if task == "sent" else None
        save_adapter(base, root / "adapters" / task, num_labels=n, seed=i, labels=labels)
    return base, root / "adapters"


def test_mixed_call_over_tasks_with_different_heads_equals_each_task_alone(served: tuple[Path, Path]) -> None:
    base, adapters = served
    store = TaskStore.open(str(base), str(adapters))
    assert store.refused == {} and [t.name for t in store.tasks()] == sorted(HEADS)
    items: list[tuple[str, str | tuple[str, str]]] = [
        ("topic", text(1)),
        ("sent", text(2, 11)),
        ("sim", (text(3), text(4))),
        ("sent", text(5, 2)),
        ("topic", text(6, 9)),
        ("sim", (text(7, 3), text(8, 10))),
    ]
    got = store.predict(items)
    assert [p.task for p in got] == [t for t, _ in items]
    for (task, inputs), pred in zip(items, got, strict=True):
        want = offline(base, adapters / task, HEADS[task], inputs)
        assert torch.allclose(torch.tensor(pred.logits), want, atol=1e-5), task
        if task == "sim":
            assert pred.label is None and pred.score == pytest.approx(float(want[0]), abs=1e-5)
        else:
            assert len(pred.scores) == HEADS[task] and pred.label == max(pred.scores, key=pred.scores.__getitem__)
    assert store.task("sent").labels == ["neg", "pos"] and store.task("topic").labels[5] == "LABEL_5"
    assert store.task("sim").problem == "regression" and store.task("sim").labels == []


@pytest.mark.parametrize("cost", [0.0, 32.0, math.inf])
def test_roberta_two_layer_heads_and_batches_cut_by_length(tmp_path: Path, cost: float) -> None:
    base = save_base(tmp_path / "base", "roberta")
    for i in range(5):
        save_adapter(
            base, tmp_path / "adapters" / f"t{i}", num_labels=2 + i, seed=i, bias_terms=["query", "intermediate"]
        )
    store = TaskStore.open(str(base), str(tmp_path / "adapters"), forward_cost_tokens=cost)
    items = [(f"t{i % 5}", text(i)) for i in range(12)]
    shapes: list[tuple[int, ...]] = []
    hook = store.model.register_forward_pre_hook(lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)  # fmt: skip
    got = store.predict(items, batch_size=5)  # several forwards, sorted by length, caller's order kept
    hook.remove()
    for (task, inputs), pred in zip(items, got, strict=True):
        want = offline(base, tmp_path / "adapters" / task, 2 + int(task[1]), inputs)
        assert torch.allclose(torch.tensor(pred.logits), want, atol=1e-5)
    lengths = sorted(len(store.tokenizer(inputs)["input_ids"]) for _, inputs in items)
    assert [rows for rows, _ in shapes] == [end - start for start, end in plan_chunks(lengths, 5, cost)]
    if cost == 0:  # padding costs more than any forward: each forward holds rows of one length
        assert [length for _, length in shapes] == sorted(set(lengths))
    elif math.isinf(cost):  # one forward per batch_size items, as without the plan
        assert [rows for rows, _ in shapes] == [5, 5, 2]


def test_plan_chunks_is_the_cheapest_cut_and_refuses_bad_arguments() -> None:
    import itertools

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        max_rows, cost = rng.randint(1, 6), rng.choice([0.0, 5.0, 30.0, 200.0])

        def total(chunks: list[tuple[int, int]], lengths: list[int] = lengths, cost: float = cost) -> float:
            return sum(cost + (end - start) * lengths[end - 1] for start, end in chunks)

        best = math.inf  # every way to cut: each gap between two rows is a cut or not
        for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(lengths)]
            chunks = list(itertools.pairwise(bounds))
            if all(end - start <= max_rows for start, end in chunks):
                best = min(best, total(chunks))
        plan = plan_chunks(lengths, max_rows, cost)
        assert [i for c in plan for i in range(*c)] == list(range(len(lengths)))
        assert all(end - start <= max_rows for start, end in plan) and total(plan) == best
    for n in range(1, 12):  # an infinite forward cost: full chunks of max_rows rows, the rest in the last one
        max_rows = rng.randint(1, 5)
        plan = plan_chunks(list(range(n)), max_rows, math.inf)
        assert [i for c in plan for i in range(*c)] == list(range(n)) and len(plan) == math.ceil(n / max_rows)
        assert all(end - start == max_rows for start, end in plan[:-1])
    with pytest.raises(ValueError, match="sorted ascending"):
        plan_chunks([3, 1], 4, 1.0)
    with pytest.raises(ValueError, match="forward_cost must be a number of tokens"):
        plan_chunks([1], 4, -1.0)
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        plan_chunks([1], 0, 1.0)


def test_bad_adapters_are_refused_by_name_and_the_others_served(served: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = served
    root = tmp_path / "adapters"
    shutil.copytree(adapters, root)
    other = save_base(tmp_path / "other", "bert", seed=1)
    # another base: wider hidden size
    import transformers

    wide = tmp_path / "wide"
    transformers.BertForSequenceClassification(
        transformers.BertConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=95
        )
    ).save_pretrained(wide)
    shutil.copy(base / "vocab.txt", wide / "vocab.txt")
    save_adapter(wide, root / "wide")
    save_adapter(other, root / "other_seed")  # same shapes, other weights: only the base fingerprint tells
    (root / "broken").mkdir()
    shutil.copy(adapters / "sent" / "adapter_config.json", root / "broken")
    data = (adapters / "sent" / "adapter_model.safetensors").read_bytes()
    (root / "broken" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "lora").mkdir()
    (root / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (root / "pickle").mkdir()
    shutil.copy(adapters / "sent" / "adapter_config.json", root / "pickle")
    (root / "pickle" / "adapter_model.bin").write_bytes(b"not read")
    store = TaskStore.open(str(base), str(root))
    assert set(store.refused) == {"wide", "broken", "lora", "pickle", "other_seed"}
    assert "another checkpoint of the same shapes" in store.refused["other_seed"]
    assert "another base" in store.refused["wide"] and "'wide'" in store.refused["wide"]
    assert "not a valid safetensors" in store.refused["broken"]
    assert "not a BitFit adapter" in store.refused["lora"]
    assert "safetensors only" in store.refused["pickle"]
    assert [t.name for t in store.tasks()] == sorted(HEADS)
    before = store.predict([("sent", text(1))])
    with pytest.raises(AdapterError, match="another base"):
        store.load("sent", str(root / "wide"))
    assert store.predict([("sent", text(1))]) == before  # the served task is unchanged
    with pytest.raises(UnknownTaskError, match="Unknown task 'nope'.*sent"):
        store.predict([("nope", text(1))])
    with pytest.raises(ValueError, match="empty"):
        store.predict([("sent", "  ")])


def test_bulk_open_shares_one_table_per_layer_and_memory_stays_near_the_payload(
    served: tuple[Path, Path], tmp_path: Path
) -> None:
    base, _ = served
    root = tmp_path / "many"
    for i in range(30):
        save_adapter(base, root / f"t{i:02d}", num_labels=2, seed=100 + i)
    store = TaskStore.open(str(base), str(root))
    assert len(store.tasks()) == 30
    payload = sum(t.params for t in store.tasks()) * 4
    assert store.resident_bytes() <= 1.2 * payload + 64 * 1024  # + the zero rows and lookups of each layer
    picks = [f"t{i:02d}" for i in (0, 7, 29, 13)]
    got = store.predict([(t, text(i)) for i, t in enumerate(picks)])
    for i, (t, pred) in enumerate(zip(picks, got, strict=True)):
        assert torch.allclose(torch.tensor(pred.logits), offline(base, root / t, 2, text(i)), atol=1e-5)


def test_add_replace_remove_while_threads_predict(served: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = served
    store = TaskStore.open(str(base), str(adapters))
    v2 = save_adapter(base, tmp_path / "sent_v2", num_labels=2, seed=9, labels=["neg", "pos"])
    extra = save_adapter(base, tmp_path / "extra", num_labels=3, seed=10)
    inputs = [text(i) for i in range(6)]
    ref = {t: [offline(base, adapters / t, n, x) for x in inputs] for t, n in HEADS.items() if n > 1}
    ref_v2 = [offline(base, v2, 2, x) for x in inputs]
    problems: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(50):
            rows = rng.sample(range(6), rng.randint(1, 6))
            tasks = [rng.choice(["sent", "topic"]) for _ in rows]
            try:
                got = store.predict([(t, inputs[r]) for t, r in zip(tasks, rows, strict=True)])
            except Exception as err:
                problems.append(repr(err))
                continue
            for t, r, pred in zip(tasks, rows, got, strict=True):
                options = [ref[t][r]] + ([ref_v2[r]] if t == "sent" else [])
                if not any(torch.allclose(torch.tensor(pred.logits), o, atol=1e-5) for o in options):
                    problems.append(f"{t} row {r}: {pred.logits} vs {[o.tolist() for o in options]}")

    def writer() -> None:
        for i in range(30):
            if stop.is_set():
                return
            store.load("sent", str(v2 if i % 2 == 0 else adapters / "sent"))
            store.load("extra", str(extra))
            store.unload("extra")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert [t.name for t in store.tasks()] == sorted(HEADS)


def test_generation_with_per_request_parameters_equals_each_task_alone(tmp_path: Path) -> None:
    from peft import PeftModel

    base = save_base(tmp_path / "base", "gpt2")
    for i in range(3):
        save_adapter(base, tmp_path / "adapters" / f"g{i}", seed=i)
    store = TaskStore.open(str(base), str(tmp_path / "adapters"))
    assert store.kind == "generator"
    requests = [GenerationRequest(f"g{i % 3}", text(i), max_new_tokens=2 + i % 4) for i in range(7)]
    got = store.generate(requests)
    tok = store.tokenizer
    for r, out in zip(requests, got, strict=True):
        model = PeftModel.from_pretrained(base_model(base, 0), str(tmp_path / "adapters" / r.task)).eval()
        enc = tok(r.prompt, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=r.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out == tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True), r
    with pytest.raises(ValueError, match="call generate"):
        store.predict([("g0", "w1")])


def test_unload_frees_the_slot_and_the_name(served: tuple[Path, Path], tmp_path: Path) -> None:
    """load x, unload x, load y, load x again: y took the freed slot, and x must get another one, not write its rows
    over y's (a name kept after unload would hand x y's slot)."""
    base, adapters = served
    store = TaskStore.open(str(base), str(adapters))
    x = save_adapter(base, tmp_path / "x", num_labels=2, seed=20)
    y = save_adapter(base, tmp_path / "y", num_labels=2, seed=21)
    inputs = [text(i) for i in range(3)]
    items = [(task, s) for s in inputs for task in ("y", "sent", "x")]
    store.load("x", str(x))
    store.unload("x")
    with pytest.raises(UnknownTaskError):
        store.predict([("x", inputs[0])])
    store.load("y", str(y))
    before = store.predict([(t, s) for t, s in items if t != "x"])
    store.load("x", str(x))
    got = store.predict(items)
    assert [p.task for p in got] == [t for t, _ in items]
    for (task, inputs_), pred in zip(items, got, strict=True):
        path = {"x": x, "y": y, "sent": adapters / "sent"}[task]
        want = offline(base, path, 2, inputs_)
        assert torch.allclose(torch.tensor(pred.logits), want, atol=1e-5), task
    assert [p.logits for p in got if p.task != "x"] == [p.logits for p in before]
    # and the cycle leaks nothing: the same tasks hold the same bytes after more rounds
    held = store.resident_bytes()
    for _ in range(3):
        store.unload("x")
        store.load("x", str(x))
    assert store.resident_bytes() == held


def test_multi_label_scores_are_independent_sigmoids(served: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = served
    torch.manual_seed(5)
    config = BitFitConfig(task_type="SEQ_CLS", init_weights=False, problem_type="multi_label_classification")
    get_peft_model(base_model(base, 3), config).save_pretrained(str(tmp_path / "tags"))
    store = TaskStore.open(str(base), str(adapters))
    store.load("tags", str(tmp_path / "tags"))
    pred = store.predict([("tags", text(1))])[0]
    want = offline(base, tmp_path / "tags", 3, text(1))
    assert torch.allclose(torch.tensor(pred.logits), want, atol=1e-5)
    assert list(pred.scores.values()) == pytest.approx(want.sigmoid().tolist(), abs=1e-5)  # not a softmax
    assert sum(pred.scores.values()) != pytest.approx(1.0, abs=1e-3)


def test_names_refusals_and_the_length_limit(served: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = served
    root = tmp_path / "adapters"
    shutil.copytree(adapters, root)
    (root / "later").mkdir()
    shutil.copy(adapters / "sent" / "adapter_config.json", root / "later")  # no weights yet: refused at open
    store = TaskStore.open(str(base), str(root), max_length=10)
    assert "later" in store.refused
    store.load("later", str(adapters / "sent"))  # fixed and loaded: no longer listed as refused
    assert "later" not in store.refused and store.task("later").name == "later"
    for name in (BASE, "", "a/b"):
        with pytest.raises(AdapterError, match="Invalid task name"):
            store.load(name, str(adapters / "sent"))
    assert BASE not in [t.name for t in store.tasks()]
    # max_length counts the special tokens: exactly 10 is served as it is, 11 is cut or refused
    exact, over = text(1, 8), text(1, 9)
    assert [len(store.tokenizer(s)["input_ids"]) for s in (exact, over)] == [10, 11]
    assert store.predict([("sent", exact, False)]) == store.predict([("sent", exact)])
    with pytest.raises(TooLongError, match="Input is 11 tokens, more than --max-length 10"):
        store.predict([("sent", over, False)])
    assert store.predict([("sent", over)])[0].task == "sent"
