"""OpenAI-compatible request and response bodies (`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`).

`model` names the task, as vLLM does for LoRA adapters; the base model's name means no adapter. The fields a client
may send are OpenAI's; those we do not implement are accepted only at their neutral value (`n=1`, penalties 0, no
logprobs, no echo), so a request that asks for more gets a 400 naming the field instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schemas import NonBlank

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Choice",
    "CompletionRequest",
    "CompletionResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "StreamOptions",
    "Usage",
]


Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with `usage` before `[DONE]`.")


class _Sampling(BaseModel):
    """The sampling fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, description="The task (adapter) name, or the base model's name.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default 16; at most --max-new-tokens).")  # fmt: skip
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Same seed, same text, whatever the batch.")
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="Up to 4 stop strings; the text ends before the first."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only 1 choice per request.")
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: a prompt (one text; a list of one text is accepted too)."""

    prompt: NonBlank | Annotated[list[NonBlank], Field(min_length=1, max_length=1)] = Field(
        description="The prompt: a text, or a list holding one text."
    )
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send one prompt per request (a text, or a list of one text)")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`: messages, formatted by the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class Choice(BaseModel):
    index: int = 0
    text: str | None = None
    message: dict[str, str] | None = None
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """A (chat) completion; `object` says which: `text_completion` or `chat.completion`."""

    id: str
    object: Literal["text_completion", "chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: texts embedded with the task's deltas, pooled as the checkpoint's sentence-transformers
    config says."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, description="The task (adapter) name, or the base model's name.")
    input: NonBlank | Annotated[list[NonBlank], Field(min_length=1)] = Field(
        description="A text or a non-empty list of texts."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes (the openai client's default)."
    )
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input is an empty list: send at least one text")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The vector, or its float32 bytes in base64.")


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
