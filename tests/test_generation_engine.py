"""The continuous-batching generation engine (`serving.engine`) on tiny seeded GPT-2, Llama and Qwen2 bases with
three random BitFit adapters each: greedy output equals `PeftModel.generate` with that adapter alone, token for
token, whatever the batch mates, arrival times and prefill chunking; sampling, stop strings, cancellation, the KV
budget, unloading mid-flight and concurrent submitters."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from tokenizers import ByteLevelBPETokenizer

from bitfit_peft import BitFitConfig
from bitfit_peft.constants import BASE
from bitfit_peft.serving import TaskStore, UnknownTaskError
from bitfit_peft.serving.engine import GenerationEngine, OverloadedError, SamplingParams
from bitfit_peft.serving.errors import BadInputError, TooLongError
from bitfit_peft.serving.model import SkinnyLinear
from bitfit_peft.serving.sampling import TextTracker, choose
from tests.models import CASES_BY_NAME

pytestmark = pytest.mark.usefixtures("single_thread")
ARCHS = ("gpt2", "llama", "qwen2")
TASKS = ("t0", "t1", "t2")
CORPUS = ["the cat sat on the mat", "une fête à l'école, très réussie", "naïve café crème brûlée"] * 20
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"  # fmt: skip
PROMPTS = ["the cat sat", "une fête à l'école", "naïve café crème brûlée the mat on the cat", "très", "the mat"]


def save_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (multi-byte characters span tokens), with a chat template."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")  # fmt: skip
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return tok


@dataclass
class Steps:
    """A `GenerationObserver` keeping the engine's steps."""

    steps: list[dict[str, Any]]

    def on_generation(self, event: str, data: dict[str, Any]) -> None:
        if event == "step":
            self.steps.append(data)


@dataclass
class Served:
    root: Path
    store: TaskStore
    engine: GenerationEngine
    steps: list[dict[str, Any]]
    references: dict[str, PeftModel | transformers.PreTrainedModel]

    def reference(self, task: str, prompt: str, max_tokens: int) -> tuple[int, ...]:
        """`generate` of the adapter alone (the base for `__base__`), greedy."""
        tok = self.store.tokenizer
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = self.references[task].generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        return tuple(ids[0, enc["input_ids"].shape[1] :].tolist())


def build(root: Path, arch: str, **engine: Any) -> Served:
    tok = save_tokenizer(root / "base")
    config = CASES_BY_NAME[arch].config()
    config.vocab_size = len(tok)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id  # fmt: skip
    config.initializer_range = 0.3  # varied greedy text (the default 0.02 repeats one token)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(root / "base")
    references: dict[str, Any] = {BASE: transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()}
    for i, task in enumerate(TASKS):
        torch.manual_seed(i + 1)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        cfg = BitFitConfig(task_type="CAUSAL_LM", init_weights=False, **CASES_BY_NAME[arch].bitfit_kwargs)
        get_peft_model(model, cfg).save_pretrained(str(root / "adapters" / task))
        fresh = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        references[task] = PeftModel.from_pretrained(fresh, str(root / "adapters" / task)).eval()
    store = TaskStore.open(str(root / "base"), str(root / "adapters"))
    steps: list[dict[str, Any]] = []
    eng = GenerationEngine(store, observer=Steps(steps), **{"prefill_chunk": 4, **engine})
    eng.start()
    return Served(root, store, eng, steps, references)


@pytest.fixture(scope="module", params=ARCHS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = build(tmp_path_factory.mktemp(request.param), request.param)
    yield s
    assert s.engine.close(30)


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_mixed_tasks_in_one_batch_equal_each_adapter_alone(served: Served) -> None:
    jobs = [(([*TASKS, BASE])[i % 4], PROMPTS[i % 5], 3 + (i * 7) % 11) for i in range(10)]
    served.steps.clear()
    handles = [served.engine.submit(t, p, greedy(n)) for t, p, n in jobs]
    outs = [h.result(120) for h in handles]
    for (task, prompt, n), out in zip(jobs, outs, strict=True):
        assert out.token_ids == served.reference(task, prompt, n), (task, prompt)
        assert out.text == served.store.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == served.engine.eos.copy().pop() else "length")
    assert max(s["tasks"] for s in served.steps) == 4  # rows of all tasks and the base decoded in one forward
    assert max(s["prefill_rows"] for s in served.steps) > 1  # prompts of several requests in one padded forward
    assert all(s["prefill_tokens"] <= 4 * s["prefill_rows"] for s in served.steps)  # at most prefill_chunk a row
    assert len({o.token_ids for o in outs}) > 5  # the adapters and prompts really give different texts
    assert served.engine.tokens_in_flight == 0


def test_requests_joining_mid_flight_with_staggered_lengths(served: Served) -> None:
    """Each request arrives while the earlier ones are decoding (after their first tokens), and leaves at its own
    max_tokens; every one still equals its adapter alone, and the prompts are prefilled in chunks of 4."""
    handles, jobs = [], []
    first = served.reference(TASKS[0], PROMPTS[2], 30)
    for i in range(5):
        job = (TASKS[i % 3], PROMPTS[(i + 2) % 5], 30 if i == 0 else 12 - 2 * i)
        before = len(served.steps)
        handles.append(served.engine.submit(job[0], job[1], greedy(job[2])))
        jobs.append(job)
        for _ in range(2000):  # until this one decodes in a step (bounded: each wait is one step)
            if len(served.steps) > before + 2 or handles[-1].done:
                break
            threading.Event().wait(0.005)
        if i and len(first) == 30:
            assert not handles[0].done  # the first one is still running when this one joins
    for job, h in zip(jobs, handles, strict=True):
        assert h.result(120).token_ids == served.reference(*job)
    assert {s["prefill_tokens"] for s in served.steps} >= {4}  # chunked prefill happened
    assert any(s["fused"] and s["rows"] for s in served.steps)  # a joining prompt shared a decode step's forward


def test_chunked_prefill_equals_unchunked(tmp_path: Path) -> None:
    one = build(tmp_path / "a", "llama", prefill_chunk=1)
    whole = build(tmp_path / "b", "llama", prefill_chunk=1000)
    try:
        for prompt in PROMPTS:
            a = one.engine.submit("t1", prompt, greedy(6)).result(60)
            b = whole.engine.submit("t1", prompt, greedy(6)).result(60)
            assert a.token_ids == b.token_ids == whole.reference("t1", prompt, 6)
        assert max(s["prefill_tokens"] for s in one.steps) == 1
    finally:
        assert one.engine.close(30) and whole.engine.close(30)


def test_decode_view_gathers_each_row_once_and_falls_back_when_too_big(tmp_path: Path) -> None:
    """Rows joining the decode view mid-flight and leaving it from the middle (their places refilled by the last
    rows): each row's keys/values are gathered from the slots once, not at every step. With a KV budget too small
    for the padded batch (one long row beside short ones), decode steps gather from the slots instead; both equal
    each adapter alone."""
    roomy = build(tmp_path / "a", "llama")
    tight = build(tmp_path / "b", "llama", max_tokens_in_flight=75)
    long = ("t0", PROMPTS[3], 40)
    shorts = [("t1", PROMPTS[4], 4), ("t2", PROMPTS[3], 9), (BASE, PROMPTS[4], 6)]
    try:
        for s in (roomy, tight):
            first = s.engine.submit(*long[:2], greedy(long[2]))
            for _ in range(4000):  # until the long row is 30 tokens in (bounded: each wait is one step)
                if len(s.steps) >= 30 or first.done:
                    break
                threading.Event().wait(0.005)
            handles = [s.engine.submit(t, p, greedy(n)) for t, p, n in shorts]
            assert first.result(60).token_ids == s.reference(*long)
            assert len(first.result(60).token_ids) == 40  # no early end: the long row is long when the others join
            for (task, prompt, n), h in zip(shorts, handles, strict=True):
                assert h.result(60).token_ids == s.reference(task, prompt, n), (task, prompt)
        cache = roomy.engine._cache
        assert cache is not None and cache.gathered_steps == 0
        assert 0 < cache.gathers <= 1 + len(shorts)  # once per row, not once per step
        assert tight.engine._cache is not None and tight.engine._cache.gathered_steps > 0
    finally:
        assert roomy.engine.close(30) and tight.engine.close(30)


def test_stop_strings_cut_the_text_and_the_stream(served: Served) -> None:
    full = served.engine.submit("t2", PROMPTS[2], greedy(20)).result(60)
    text = full.text
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = text.find(stop)
    out = served.engine.submit("t2", PROMPTS[2], greedy(20, stop=("never there", stop))).result(60)
    assert (out.text, out.finish_reason) == (text[:cut], "stop")

    async def streamed() -> str:
        h = served.engine.submit("t2", PROMPTS[2], greedy(20, stop=(stop,)))
        return "".join([d async for d in h.stream()])

    assert asyncio.run(streamed()) == text[:cut]


def test_stream_equals_result_and_holds_back_partial_characters(served: Served) -> None:
    async def both() -> tuple[list[str], str]:
        h = served.engine.submit("t0", PROMPTS[1], SamplingParams(max_tokens=25, seed=3))
        deltas = [d async for d in h.stream()]
        return deltas, (await h.wait()).text

    deltas, text = asyncio.run(both())
    assert "".join(deltas) == text and len(deltas) > 1  # (random bytes: a \ufffd inside the text is final)
    tok = served.store.tokenizer
    ids = tok("€", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # one character, three byte-level tokens
    tracker = TextTracker(tok, stop=("xyz",))
    tracker.add(ids[:2])
    assert tracker.delta(final=False) == ""
    tracker.add([*ids, *tok("x", add_special_tokens=False)["input_ids"]])
    assert tracker.delta(final=False) == "€"  # "x" may start the stop string: held back
    assert tracker.delta(final=True) == "x"


def test_seed_gives_the_same_text_whatever_the_batch_mates(served: Served) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = served.engine.submit("t1", PROMPTS[0], params).result(60)
    mates = [served.engine.submit(TASKS[i % 3], PROMPTS[i % 5], SamplingParams(max_tokens=8, seed=i)) for i in range(4)]  # fmt: skip
    together = served.engine.submit("t1", PROMPTS[0], params)
    mates += [served.engine.submit("t0", PROMPTS[3], SamplingParams(max_tokens=8))]
    assert together.result(60).token_ids == alone.token_ids
    for h in mates:
        h.result(60)
    others = {served.engine.submit("t1", PROMPTS[0], SamplingParams(max_tokens=10, seed=s)).result(60).token_ids for s in range(8)}  # fmt: skip
    assert len(others) > 1  # sampling does sample


def test_chat_messages_use_the_template(served: Served) -> None:
    messages = [{"role": "user", "content": "the cat"}]
    out = served.engine.submit("t0", messages, greedy(5)).result(60)
    rendered = "user: the cat\nassistant:"
    assert out.prompt_tokens == len(served.store.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_budget_cancel_and_errors(tmp_path: Path) -> None:
    s = build(tmp_path, "gpt2", max_tokens_in_flight=50)
    try:
        long = s.engine.submit("t0", "the cat", greedy(40))
        for _ in range(2000):  # until it is admitted (it reserved its tokens)
            if s.engine.tokens_in_flight:
                break
            threading.Event().wait(0.005)
        with pytest.raises(OverloadedError, match="tokens in flight") as err:
            s.engine.submit("t1", "the cat", greedy(20)).result(60)
        assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
        long.cancel()
        with pytest.raises(Exception, match="cancelled"):
            long.result(60)
        for _ in range(2000):
            if not s.engine.tokens_in_flight:
                break
            threading.Event().wait(0.005)
        assert s.engine.tokens_in_flight == 0
        assert s.engine.submit("t1", "the cat", greedy(20)).result(60).completion_tokens >= 1
        with pytest.raises(TooLongError, match="whole budget of 50"):
            s.engine.submit("t1", "the cat", greedy(49)).result(60)
        # a request that needs exactly the whole (idle) budget fits: prompt + max_tokens == 50
        prompt = len(s.store.tokenizer("the cat")["input_ids"])
        assert s.engine.tokens_in_flight == 0
        assert s.engine.submit("t1", "the cat", greedy(50 - prompt)).result(60).prompt_tokens == prompt
        with pytest.raises(BadInputError, match="empty"):
            s.engine.submit("t1", "  ", greedy(2)).result(60)
        with pytest.raises(UnknownTaskError, match="nope"):
            s.engine.submit("nope", "the cat", greedy(2))
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=-1)
        with pytest.raises(ValueError, match="max_tokens"):
            SamplingParams(max_tokens=0)
    finally:
        assert s.engine.close(30)


def test_unload_mid_flight_fails_that_request_only(tmp_path: Path) -> None:
    s = build(tmp_path, "qwen2")
    try:
        doomed = s.engine.submit("t1", "the cat", greedy(40))
        other = s.engine.submit("t2", "the cat", greedy(40))
        for _ in range(2000):
            if len(s.steps) >= 3:
                break
            threading.Event().wait(0.005)
        s.store.unload("t1")
        with pytest.raises(UnknownTaskError, match="unloaded while generating"):
            doomed.result(60)
        assert other.result(60).token_ids == s.reference("t2", "the cat", 40)
        assert s.engine.tokens_in_flight == 0
    finally:
        assert s.engine.close(30)


def test_many_threads_submitting_at_once(served: Served) -> None:
    results: dict[tuple[int, int], Any] = {}

    def client(k: int) -> None:
        for j in range(3):
            task, prompt, n = TASKS[(k + j) % 3], PROMPTS[(k * 3 + j) % 5], 2 + (k + j) % 6
            results[k, j] = (task, prompt, n, served.engine.submit(task, prompt, greedy(n)).result(120))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 18
    for task, prompt, n, out in results.values():
        assert out.token_ids == served.reference(task, prompt, n)


@pytest.mark.parametrize("bias", [True, False])
def test_skinny_head_equals_linear_for_every_row_count(bias: bool) -> None:
    """`SkinnyLinear` (here capped at 16 rows: `weight @ x.T` for 1-16 rows on the CPU) gives `nn.Linear`'s outputs,
    in its shape, for 1 to 20 rows in 2-D and 3-D, shares the weight it wraps (tied embeddings stay tied), and runs
    `nn.Linear` itself when gradients are on."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    head = SkinnyLinear.of(linear, 16)
    assert head.weight is linear.weight and head.bias is linear.bias
    assert set(head.state_dict()) == set(linear.state_dict())
    with torch.inference_mode():
        for shape in [(1, 24), (2, 24), (3, 24), (16, 24), (17, 24), (20, 24), (1, 1, 24), (3, 1, 24), (2, 5, 24)]:
            x = torch.randn(shape)
            out = head(x)
            assert out.shape == (*shape[:-1], 40)
            torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 24, requires_grad=True)
    head(x).sum().backward()
    assert x.grad is not None


def test_served_causal_lm_has_the_skinny_head_on_its_tied_embeddings(served: Served) -> None:
    model: Any = served.store.model
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # an adapter with a bias on the head wraps it in a BitFitLayer
    assert isinstance(head, SkinnyLinear)
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight


class _Chars:
    """A tokenizer stub for `TextTracker`: token id i decodes to chr(i)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def test_text_tracker_cuts_at_the_earliest_stop_string_whichever_is_listed_first() -> None:
    tracker = TextTracker(_Chars(), stop=("END", "x"))
    tracker.add([ord(c) for c in "abxcdEND"])
    assert (tracker.text, tracker.stopped) == ("ab", True)
    tracker = TextTracker(_Chars(), stop=("zz",))
    tracker.add([ord(c) for c in "abc"])
    assert (tracker.text, tracker.stopped) == ("abc", False)


def test_top_p_keeps_the_smallest_set_that_reaches_it_and_always_the_top_token() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()  # probabilities 0.5, 0.3, 0.2, 0
    g = torch.Generator().manual_seed(0)
    drawn = {choose(logits, SamplingParams(temperature=1.0, top_p=0.6), g) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.6, so the second token is needed to reach it; the third is not
    peaked = torch.tensor([0.95, 0.05]).log()
    assert {choose(peaked, SamplingParams(temperature=1.0, top_p=0.9), g) for _ in range(50)} == {0}
    assert choose(torch.tensor([0.1, 3.0, 0.2]), SamplingParams(temperature=0), None) == 1
