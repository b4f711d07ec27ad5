"""Turning one adapter read from disk into what a `TaskStore` serves: full-width delta rows, head modules and a
`TaskInfo`, after checking it against the served base (task type, targets, shapes, head structure, labels).

Nothing here changes the served model: `TaskStore` installs the result under its writer lock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import read_config
from ..constants import PREFIX, WEIGHTS_NAME, strip_peft_prefix
from ..files import read_safetensors_header
from ..fingerprint import fingerprint
from ..layer_types import bias_shape
from ..targets import select_targets
from .adapters import AdapterError, AdapterFile
from .model import HEAD_NAMES, TaskHeads, task_head

__all__ = ["Preparer", "TaskInfo", "head_keys", "task_type"]


@dataclass(frozen=True)
class TaskInfo:
    """What a served task is (see `TaskStore.tasks`)."""

    name: str
    problem: (
        str  # "single_label_classification" | "multi_label_classification" | "regression" | "generation" | "embedding"
    )
    labels: list[str]
    bias_terms: list[str] | None
    size_bytes: int
    params: int
    path: str
    loaded_at: float
    fingerprint: str | None = None


class Preparer:
    """Checks adapters against one served base model and converts them (see the module docstring).

    Args:
        model (`nn.Module`): the served model.
        kind (`str`): `"classifier"` or `"generator"`.
        heads (`dict[str, TaskHeads]`): the head routers of a classifier, by head name.
    """

    def __init__(self, model: nn.Module, kind: str, heads: dict[str, TaskHeads]) -> None:
        self.model = model
        self.kind = kind
        self.heads = heads
        self._config: dict[str, Any] = model.config.to_dict()  # type: ignore[union-attr,operator]
        self._selections: dict[str, dict[str, list[int] | None]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}  # module path -> bias shape (read once per module)
        self._fingerprints: dict[str, str] = {}  # selection key -> this base's fingerprint over those targets
        # where the encoder sits in a classifier (`bert`, `roberta`, ...): embedding adapters are saved below it
        self.encoder_prefix: str = str(
            getattr(model, "encoder_attribute", None) or getattr(model, "base_model_prefix", "")
        )

    def __call__(self, adapter: AdapterFile) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module], TaskInfo]:
        """Check an adapter against this base and turn it into full-width delta rows (module path -> tensor), its
        head modules (head name -> module) and its `TaskInfo`. Reads the model, changes nothing."""
        where = f"adapter {adapter.name!r} ({adapter.path})"
        task_type = adapter.config.task_type
        if (self.kind == "generator") != (task_type == "CAUSAL_LM"):
            raise AdapterError(
                f"{where}: task_type {task_type!r} does not fit this {self.kind} server "
                f"({'CAUSAL_LM' if self.kind == 'generator' else 'SEQ_CLS'} expected)."
            )
        embedding = task_type == "FEATURE_EXTRACTION"  # a bare-encoder adapter: its paths are below the encoder
        if embedding:
            adapter.deltas = {f"{self.encoder_prefix}.{k}": v for k, v in adapter.deltas.items()}
        selection = self._selection(adapter, where)
        missing, unexpected = (
            sorted(set(selection) - set(adapter.deltas)),
            sorted(set(adapter.deltas) - set(selection)),
        )
        if missing or unexpected:
            raise AdapterError(
                f"{where}: its deltas do not match the modules its config targets on this base (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}); it was trained on another base model or architecture."
            )
        rows: dict[str, torch.Tensor] = {}
        for key, delta in adapter.deltas.items():
            shape = self._shapes.get(key)
            if shape is None:
                shape = self._shapes[key] = bias_shape(self.model.get_submodule(key))
            positions = selection[key]
            want = (len(positions),) if positions is not None else shape
            if tuple(delta.shape) != tuple(want):
                raise AdapterError(
                    f"{where}: delta of {key} has shape {tuple(delta.shape)}, this base needs {tuple(want)}; the "
                    "adapter was trained on another base model."
                )
            if positions is not None:
                delta = delta.new_zeros(shape).index_add(0, torch.tensor(positions), delta)
            rows[key] = delta
        self._check_fingerprint(adapter, selection, where)
        heads, width = self._task_heads(adapter, where) if not embedding else ({}, 0)
        config = adapter.config
        if embedding and adapter.head:
            raise AdapterError(f"{where}: an embedding (FEATURE_EXTRACTION) adapter with saved modules {sorted(adapter.head)[:3]} cannot be served: only its deltas are used.")  # fmt: skip
        problem = (
            "generation"
            if self.kind == "generator"
            else "embedding"
            if embedding
            else config.problem_type or ("regression" if width == 1 else "single_label_classification")
        )
        labels: list[str] = []
        if problem not in ("regression", "generation", "embedding"):
            labels = list(config.labels or [f"LABEL_{i}" for i in range(width)])
        if labels and len(labels) != width:
            raise AdapterError(f"{where}: {len(labels)} label names for a head with {width} outputs.")
        info = TaskInfo(
            name=adapter.name,
            problem=problem,
            labels=labels,
            bias_terms=sorted(config.bias_terms) if config.bias_terms else None,
            size_bytes=adapter.size_bytes,
            params=adapter.params,
            path=os.path.abspath(adapter.path),
            loaded_at=time.time(),
            fingerprint=config.base_fingerprint,
        )
        return rows, heads, info

    def _selection(self, adapter: AdapterFile, where: str) -> dict[str, list[int] | None]:
        key = adapter.selection_key()
        if key not in self._selections:
            embedding = adapter.config.task_type == "FEATURE_EXTRACTION"
            model = self.model.get_submodule(self.encoder_prefix) if embedding else self.model
            prefix = f"{self.encoder_prefix}." if embedding else ""
            try:
                found = select_targets(model, adapter.config, self._config)
                self._selections[key] = {prefix + k: v for k, v in found.items()}
            except (TypeError, ValueError) as err:
                raise AdapterError(f"{where}: its config does not fit this base model ({err}).") from None
        return self._selections[key]

    def _check_fingerprint(self, adapter: AdapterFile, selection: dict[str, list[int] | None], where: str) -> None:
        """Refuse an adapter whose recorded base fingerprint is not this base's (another checkpoint of the same
        shapes, which the shape checks cannot see). Adapters saved without a fingerprint are served."""
        expected = adapter.config.base_fingerprint
        if not expected:
            return
        key = adapter.selection_key()
        served = self._fingerprints.get(key)
        if served is None:
            if adapter.config.task_type == "FEATURE_EXTRACTION":  # recorded on the bare encoder
                n = len(self.encoder_prefix) + 1
                encoder = self.model.get_submodule(self.encoder_prefix)
                served = self._fingerprints[key] = fingerprint(encoder, sorted(k[n:] for k in selection))
            else:
                served = self._fingerprints[key] = fingerprint(self.model, sorted(selection))
        if served != expected:
            raise AdapterError(
                f"{where}: it was trained on {adapter.config.base_model_name_or_path!r} (base fingerprint "
                f"{expected}) but this server's base has fingerprint {served}: another checkpoint of the same shapes. "
                "Serve it on the base it was trained on."
            )

    def _task_heads(self, adapter: AdapterFile, where: str) -> tuple[dict[str, nn.Module], int]:
        if self.kind == "generator":
            if adapter.head:
                raise AdapterError(
                    f"{where}: a generation adapter with saved modules {sorted(adapter.head)[:3]} "
                    "cannot be served (only bias deltas are routed per request)."
                )
            return {}, 0
        by_head: dict[str, dict[str, torch.Tensor]] = {}
        for path, value in adapter.head.items():
            name, _, rest = path.partition(".")
            if name not in self.heads:
                raise AdapterError(
                    f"{where}: saved module {path} is not a task head of this base ({sorted(self.heads)})."
                )
            by_head.setdefault(name, {})[rest] = value
        final = next((n for n in reversed(HEAD_NAMES) if n in by_head), None)
        if final is None:
            raise AdapterError(
                f"{where}: no task head saved with the adapter; train it with task_type='SEQ_CLS' so the head is "
                "saved next to the deltas."
            )
        modules: dict[str, nn.Module] = {}
        width = 0
        for name, state in by_head.items():
            modules[name], w = task_head(self.heads[name], name, state, where)
            if name == final:
                width = w
        return modules, width


def task_type(path: str) -> str | None:
    """The `task_type` in an adapter directory's config, or None when it cannot be read."""
    try:
        value = read_config(path).task_type
    except ValueError:
        return None  # reported when the adapter itself is read
    return value if isinstance(value, str) else None


def head_keys(paths: dict[str, str]) -> set[str] | None:
    """The head parameter names of the first adapter whose file header can be read (decides which head family the
    base is built with; adapters of the other family are then refused by name), or None."""
    for path in paths.values():
        try:
            header, _ = read_safetensors_header(os.path.join(path, WEIGHTS_NAME))
        except ValueError:
            continue  # reported when the adapter itself is read
        return {strip_peft_prefix(k) for k in header if PREFIX not in k and k != "__metadata__"}
    return None
