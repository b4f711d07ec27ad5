"""Request and response bodies of the HTTP server, as pydantic models (validated on arrival, documented at /docs).

A field that fails validation becomes a 422 that names it (FastAPI's `detail` list). Requests name their task in
`task`; `model` (vLLM, OpenAI) and `adapter_id` (LoRAX) are accepted as aliases so existing clients carry over.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AdapterLoadRequest",
    "AdapterResponse",
    "AdapterUnloadRequest",
    "BatchPredictRequest",
    "BatchPredictResponse",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "ModelCard",
    "ModelList",
    "PredictRequest",
    "PredictResponse",
    "TaskCard",
]

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Inputs = str | tuple[str, str]
_TASK = Field(
    validation_alias=AliasChoices("task", "model", "adapter_id"),
    min_length=1,
    max_length=128,
    description="The task (adapter) name; `model` and `adapter_id` are accepted too.",
)


def _not_blank(inputs: Inputs) -> Inputs:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if any(not text.strip() for text in texts):
        raise ValueError("input text is empty (or only whitespace): send at least one word")
    return inputs


class PredictRequest(BaseModel):
    """One input for one task: a text, or a text pair `["first", "second"]` for pair tasks (like TEI's /predict)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    task: str = _TASK
    inputs: Inputs = Field(description="A text, or a pair of texts for sentence-pair tasks.")
    truncate: bool = Field(False, description="Truncate inputs longer than --max-length tokens instead of a 413.")

    _check = field_validator("inputs")(_not_blank)


class PredictItem(BaseModel):
    """One (task, inputs) item of a mixed request."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    task: str = _TASK
    inputs: Inputs

    _check = field_validator("inputs")(_not_blank)


class BatchPredictRequest(BaseModel):
    """A mixed list of (task, inputs) items, answered in order; every item is checked before any is queued."""

    model_config = ConfigDict(extra="forbid")
    items: list[PredictItem] = Field(min_length=1, description="The items, of any tasks, in any order.")
    truncate: bool = Field(False, description="Truncate inputs longer than --max-length tokens instead of a 413.")


class PredictResponse(BaseModel):
    task: str
    label: str | None = Field(description="The most probable label; null for regression tasks.")
    scores: dict[str, float] = Field(description="Softmax probability per label; empty for regression tasks.")
    score: float | None = Field(description="The regression value; null for classification tasks.")
    logits: list[float]


class BatchPredictResponse(BaseModel):
    predictions: list[PredictResponse]


class GenerateRequest(BaseModel):
    """A prompt for a task of a decoder base (vLLM/LoRAX sampling parameter names)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    task: str = _TASK
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    do_sample: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        return str(_not_blank(prompt))


class GenerateResponse(BaseModel):
    task: str
    generated_text: str


class TaskCard(BaseModel):
    """What the server knows about one loaded task (the store's `TaskInfo`)."""

    name: str
    problem: str
    labels: list[str]
    bias_terms: list[str] | None
    size_bytes: int
    params: int
    path: str
    loaded_at: float
    fingerprint: str | None


class ModelCard(BaseModel):
    """One entry of /v1/models, shaped like vLLM's (a task is a model whose `parent` is the base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bitfit-peft"
    root: str
    parent: str | None
    kind: str | None = Field(None, description="For the base: 'classifier' or 'generator'.")
    bitfit: TaskCard | None = Field(None, description="For a task: its BitFit adapter.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoadRequest(BaseModel):
    """Load a task, or replace it (hotswap) if the name is loaded; vLLM's `lora_name`/`lora_path` also work."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(validation_alias=AliasChoices("name", "lora_name"), pattern=TASK_NAME)
    path: str = Field(
        validation_alias=AliasChoices("path", "lora_path"),
        min_length=1,
        description="The adapter directory, relative to --adapters (or absolute, but inside it).",
    )


class AdapterUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(validation_alias=AliasChoices("name", "lora_name"), min_length=1)


class AdapterResponse(BaseModel):
    operation: Literal["load", "hotswap", "unload"]
    name: str
    seconds: float
    task: TaskCard | None = None


class ErrorResponse(BaseModel):
    """Every error but field validation (422 `detail`): a message that says what to do, and its type."""

    error: str
    error_type: str
    tasks: list[str] | None = None
    detail: Any = None
