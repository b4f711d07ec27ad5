"""Per-request generation settings and text: `SamplingParams`, `Completion`, a prompt's token ids (text or chat
messages), the next-token choice of one row, and `TextTracker`, which turns a row's token ids into final text (stop
strings, incremental deltas for streaming).

Sampling follows OpenAI's semantics: `temperature=0` is greedy (the argmax, as `generate(do_sample=False)`), any
other temperature scales the logits, `top_p` keeps the smallest set of tokens whose probability reaches `top_p`,
and a `seed` gives the request its own `torch.Generator`, so the same seed gives the same text whatever the other
rows of the batch are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BadInputError

__all__ = ["Completion", "Prompt", "SamplingParams", "TextTracker", "check_prompt", "choose", "prompt_ids"]
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    Args:
        max_tokens (`int`): most new tokens (>= 1).
        temperature (`float`): 0 is greedy; otherwise in (0, 2].
        top_p (`float`): nucleus sampling, in (0, 1].
        seed (`int`, *optional*): this request's own random generator; None draws a fresh seed.
        stop (`tuple[str, ...]`): stop strings (at most 4, non-empty): the output ends before the first one.

    Example:

    >>> SamplingParams(max_tokens=8, temperature=0.0).max_tokens
    8
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2 or math.isnan(self.temperature):  # fmt: skip
            raise ValueError(f"temperature must be a number in [0, 2] (0 = greedy), got {self.temperature!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}.")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}.")
        if len(self.stop) > 4:
            raise ValueError(f"stop takes at most 4 strings (as OpenAI's API), got {len(self.stop)}.")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class Completion:
    """The result of one request.

    Args:
        text (`str`): the generated text (special tokens and any stop string left out).
        finish_reason (`str`): `"stop"` (end-of-sequence token or a stop string) or `"length"` (`max_tokens`).
        prompt_tokens (`int`), completion_tokens (`int`): token counts, for `usage`.
        token_ids (`tuple[int, ...]`): the generated token ids (with the end-of-sequence token if one ended it).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()


def check_prompt(prompt: Prompt) -> None:
    """Refuse a prompt that is neither a text nor a list of `{"role": str, "content": str}` messages."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise BadInputError(f"prompt must be a text or a non-empty list of chat messages, got {type(prompt).__name__}.")  # fmt: skip
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):  # fmt: skip
            raise BadInputError(f'Each chat message must be {{"role": str, "content": str}}, got {message!r}.')


def prompt_ids(tokenizer: Any, prompt: Prompt, base_name: str) -> list[int]:
    """The token ids of a text prompt, or of chat messages rendered by the tokenizer's chat template (with the
    generation prompt); `BadInputError` for an empty text, a base without a template, or messages it refuses."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadInputError("The prompt is empty: send a non-empty prompt.")
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"The base {base_name!r} has no chat template: send a text prompt (/v1/completions) instead of messages.")  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template that refuses these messages (e.g. roles out of order)
        raise BadInputError(f"The chat template cannot render these messages: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row from its `(vocab,)` logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    probs = scores.softmax(-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextTracker:
    """The text of one row so far: what is final (safe to stream) and whether a stop string ended it.

    The whole generated sequence is decoded at each token, so characters spanning several tokens come out whole:
    a trailing replacement character (an incomplete UTF-8 sequence) is held back, and so is any tail that could
    still become a stop string.

    Args:
        tokenizer: decodes ids (`skip_special_tokens=True`).
        stop (`tuple[str, ...]`): the stop strings.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.sent = 0  # characters of `text` handed out as deltas
        self.stopped = False

    def add(self, ids: list[int]) -> None:
        """Decode `ids` (the row's generated tokens so far) and cut at the first stop string, if any."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def delta(self, final: bool) -> str:
        """The text that became final since the last call (all the rest when `final`)."""
        text = self.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = 0
            for s in self.stop:  # hold back a tail that is the start of a stop string
                for k in range(min(len(s) - 1, end), hold, -1):
                    if text[end - k : end] == s[:k]:
                        hold = k
                        break
            end -= hold
        if end <= self.sent:
            return ""
        out = text[self.sent : end]
        self.sent = end
        return out
