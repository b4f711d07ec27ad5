"""Serving many BitFit tasks on one base model: the thread-safe `TaskStore` (bulk adapter loading, mixed-task
`predict` and `generate`, tasks with different heads, add/replace/remove while serving)."""

from .errors import AdapterError, ServingError, UnknownTaskError
from .store import GenerationRequest, Prediction, TaskInfo, TaskStore

__all__ = [
    "AdapterError",
    "GenerationRequest",
    "Prediction",
    "ServingError",
    "TaskInfo",
    "TaskStore",
    "UnknownTaskError",
]
