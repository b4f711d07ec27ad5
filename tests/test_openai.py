"""OpenAI's completion routes on a decoder base, driven by the official `openai` client against the real server on
127.0.0.1: greedy answers equal the engine's offline output (itself equal to `PeftModel.generate` alone,
tests/test_generation_engine.py), streamed or not; usage, finish_reason, stop; OpenAI's error shape and 400s."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra")
openai = pytest.importorskip("openai", reason="the test extra: pip install openai")

from test_generation_engine import PROMPTS, build  # noqa: E402
from test_server import running  # noqa: E402

from bitfit_peft.constants import BASE  # noqa: E402
from bitfit_peft.serving.engine import SamplingParams  # noqa: E402
from bitfit_peft.serving.server import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_completions_and_chat_streamed_or_not_equal_the_engine_offline(tmp_path: Path) -> None:
    served = build(tmp_path, "llama")  # a byte-level BPE tokenizer with a chat template; tasks t0, t1, t2
    base = str(served.root / "base")
    offline = served.engine
    app = create_app(ServeSettings(base=base, adapters=str(served.root / "adapters"), max_new_tokens=8), served.store)
    try:
        with running(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            for i, model in enumerate(["t0", "t1", base]):  # the base's name: no adapter
                task, prompt = (BASE if model == base else model), PROMPTS[i]
                want = offline.submit(task, prompt, SamplingParams(max_tokens=6, temperature=0)).result(timeout=60)
                assert want.text  # the tokenizer decodes: the comparisons below compare text
                got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
                assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
                assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
                    want.prompt_tokens,
                    want.completion_tokens,
                    want.prompt_tokens + want.completion_tokens,
                )
                chunks = list(client.completions.create(model=model, prompt=[prompt], max_tokens=6, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))  # fmt: skip
                assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want.completion_tokens
                assert chunks[-1].usage.total_tokens == want.prompt_tokens + want.completion_tokens
                finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
                assert finishes == [None] * (len(finishes) - 1) + [want.finish_reason]  # one, in the last chunk
            # a 2-token budget ends by length, streamed or not (not every ending is "stop")
            short = offline.submit("t0", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0)).result(timeout=60)
            assert short.finish_reason == "length"
            streamed = list(client.completions.create(model="t0", prompt=PROMPTS[0], max_tokens=2, temperature=0, stream=True))  # fmt: skip
            assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
            messages = [{"role": "user", "content": PROMPTS[3]}]
            want = offline.submit("t2", messages, SamplingParams(max_tokens=6, temperature=0)).result(timeout=60)
            chat = client.chat.completions.create(model="t2", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
            assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
            # OpenAI's newer name for the budget wins over the older one
            three = offline.submit("t2", messages, SamplingParams(max_tokens=3, temperature=0)).result(timeout=60)
            newer = client.chat.completions.create(model="t2", messages=messages, max_completion_tokens=3, temperature=0)  # type: ignore[arg-type]  # fmt: skip
            assert (newer.choices[0].message.content, newer.usage.completion_tokens) == (three.text, three.completion_tokens)  # fmt: skip
            stream = client.chat.completions.create(
                model="t2", messages=messages, max_tokens=6, temperature=0, stream=True
            )  # type: ignore[arg-type]
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
            seeded = [client.completions.create(model="t0", prompt="the cat", max_tokens=5, seed=7, temperature=1.0)
                      for _ in range(2)]  # fmt: skip
            assert seeded[0].choices[0].text == seeded[1].choices[0].text  # same seed, same text
            for bad, field in (
                (dict(n=2), "n"),
                (dict(best_of=3), "best_of"),
                (dict(logit_bias={"1": 1}), "logit_bias"),
            ):
                with pytest.raises(openai.BadRequestError) as err:
                    client.completions.create(model="t0", prompt="the", max_tokens=2, **bad)  # type: ignore[arg-type]
                assert err.value.body["param"] == field, err.value.body
            with pytest.raises(openai.BadRequestError, match="more than the server allows"):
                client.completions.create(model="t0", prompt="the", max_tokens=9)
            with pytest.raises(openai.NotFoundError) as missing:
                client.completions.create(model="nope", prompt="the", max_tokens=2)
            assert missing.value.body["type"] == "unknown_task" and "t0, t1, t2" in missing.value.body["message"]
    finally:
        assert offline.close(30)
