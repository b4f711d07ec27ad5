"""Request bodies of the HTTP server as pydantic models (validated on arrival, documented at /docs), and the few
responses that are HTTP-only. The engine's own types (`TaskInfo`, `Prediction`) are answered as they are: FastAPI
documents and serialises those dataclasses directly, so there is one type per concept.

A field that fails validation becomes a 422 that names it (a 400 in OpenAI's shape on the OpenAI routes). Every
constraint the server enforces on a field is stated here, so the OpenAPI schema says what the server takes.
Requests name their task in `task`; `model` (vLLM, OpenAI) and `adapter_id` (LoRAX) are accepted as aliases.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, WithJsonSchema

from .prepare import TaskInfo
from .store import Prediction

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
    "PredictItem",
    "PredictRequest",
    "Inputs",
    "NonBlank",
]

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A text with at least one non-space character: the pattern is the schema's statement of the server's check.
_TEXT = {"type": "string", "minLength": 1, "pattern": r"\S"}


def _not_blank(value: Any) -> Any:
    texts = [value] if isinstance(value, str) else list(value)
    if any(not text.strip() for text in texts):
        raise ValueError("input text is empty (or only whitespace): send at least one word")
    return value


# Checked by `_not_blank` (one clear message, located at the field); the schema states the same rule.
NonBlank = Annotated[str, AfterValidator(_not_blank), WithJsonSchema(_TEXT)]
Inputs = Annotated[
    str | tuple[str, str],
    AfterValidator(_not_blank),
    WithJsonSchema({"anyOf": [_TEXT, {"type": "array", "prefixItems": [_TEXT, _TEXT], "minItems": 2, "maxItems": 2}]}),
]
_TASK = Field(
    validation_alias=AliasChoices("task", "model", "adapter_id"),
    min_length=1,
    max_length=128,
    description="The task (adapter) name; `model` and `adapter_id` are accepted too.",
)


class PredictItem(BaseModel):
    """One (task, inputs) item of a mixed request: a text, or a text pair `["first", "second"]`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    task: str = _TASK
    inputs: Inputs = Field(description="A text, or a pair of texts for sentence-pair tasks; neither may be blank.")


class PredictRequest(PredictItem):
    """One input for one task (like TEI's /predict)."""

    truncate: bool = Field(False, description="Truncate inputs longer than --max-length tokens instead of a 413.")


class BatchPredictRequest(BaseModel):
    """A mixed list of (task, inputs) items, answered in order; every item is checked before any is queued."""

    model_config = ConfigDict(extra="forbid")
    items: list[PredictItem] = Field(min_length=1, description="The items, of any tasks, in any order.")
    truncate: bool = Field(False, description="Truncate inputs longer than --max-length tokens instead of a 413.")


class BatchPredictResponse(BaseModel):
    predictions: list[Prediction]


class GenerateRequest(BaseModel):
    """A prompt for a task of a decoder base (vLLM/LoRAX sampling parameter names; greedy unless `do_sample`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    task: str = _TASK
    prompt: NonBlank = Field(description="A non-blank prompt.")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    do_sample: bool = False


class GenerateResponse(BaseModel):
    task: str
    generated_text: str


class ModelCard(BaseModel):
    """One entry of /v1/models, shaped like vLLM's (a task is a model whose `parent` is the base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bitfit-peft"
    root: str
    parent: str | None
    kind: str | None = Field(None, description="For the base: 'classifier' or 'generator'.")
    bitfit: TaskInfo | None = Field(None, description="For a task: its BitFit adapter.")


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
        pattern=r"^[^\x00]+$",
        description="The adapter directory, relative to --adapters (or absolute, but inside it).",
    )


class AdapterUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(validation_alias=AliasChoices("name", "lora_name"), min_length=1)


class AdapterResponse(BaseModel):
    operation: Literal["load", "hotswap", "unload"]
    name: str
    seconds: float
    task: TaskInfo | None = None


class ErrorResponse(BaseModel):
    """Every error outside the OpenAI routes: a message that says what to do, and its type. Field validation
    (422) adds `detail`, FastAPI's list of failing fields; a 500 adds the `request_id` that the server logged."""

    error: str
    error_type: str
    tasks: list[str] | None = None
    detail: Any = None
    request_id: str | None = None
