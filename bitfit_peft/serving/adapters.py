"""Reading adapter directories for serving: one adapter's config, deltas and task head, checked before use.

Only safetensors files are read (no pickle), and every problem is an `AdapterError` naming the adapter, the file
and the fix, raised before anything is served.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import BitFitConfig, read_config
from ..constants import CONFIG_NAME, DELTA_ATTR, WEIGHTS_NAME, strip_peft_prefix
from ..files import read_adapter_weights
from .errors import AdapterError, UnknownTaskError

__all__ = ["AdapterError", "AdapterFile", "UnknownTaskError", "read_adapter", "scan"]

# BitFitConfig fields that decide which modules an adapter targets
SELECTION_FIELDS = (
    "target_modules",
    "bias_terms",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "add_missing_bias",
    "task_type",
)


@dataclass
class AdapterFile:
    """One adapter read from disk.

    Args:
        name (`str`): the task name it is served under.
        path (`str`): its directory.
        config (`BitFitConfig`): its adapter_config.json (`config.read_config`).
        deltas (`dict[str, torch.Tensor]`): module path (no peft prefix) -> delta, float32.
        head (`dict[str, torch.Tensor]`): head parameter path (e.g. `classifier.out_proj.weight`) -> value.
        size_bytes (`int`): size of the weights file.
    """

    name: str
    path: str
    config: BitFitConfig
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def params(self) -> int:
        return sum(t.numel() for t in (*self.deltas.values(), *self.head.values()))

    def selection_key(self) -> str:
        """Adapters with the same key target the same modules."""
        return json.dumps({k: _canonical(getattr(self.config, k)) for k in SELECTION_FIELDS}, sort_keys=True)


def _canonical(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def read_adapter(name: str, path: str) -> AdapterFile:
    """Read and check the adapter in directory `path` (served as task `name`).

    Raises:
        AdapterError: the directory, config or weights are missing, unreadable, not BitFit, or hold non-finite values.
    """
    where = f"adapter {name!r} ({path})"
    try:
        config = read_config(path)
    except ValueError as err:
        raise AdapterError(f"{where}: {err}") from None
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise AdapterError(
            f"{where}: no {WEIGHTS_NAME}. Serving reads safetensors only (a pickle adapter_model.bin could run code); "
            "convert it with model.save_pretrained(..., safe_serialization=True)."
        )
    try:
        tensors = read_adapter_weights(weights)  # packed (int8 / sparse) files decoded to float32
    except ValueError as err:
        raise AdapterError(f"{where}: {err}") from None
    adapter = AdapterFile(name=name, path=path, config=config, size_bytes=os.path.getsize(weights))
    marker = f".{DELTA_ATTR}"
    for key, value in tensors.items():
        key = strip_peft_prefix(key)
        if not value.is_floating_point():
            raise AdapterError(f"{where}: tensor {key} has dtype {value.dtype}, expected floating point.")
        if key.endswith(marker):
            adapter.deltas[key.removesuffix(marker)] = value.float()
        else:
            adapter.head[key] = value.clone()  # heads outlive the file buffer; deltas are copied into tables
    if not adapter.deltas:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} holds no BitFit deltas (keys ending in {marker}).")
    return adapter


def scan(root: str) -> dict[str, str]:
    """Task name -> adapter directory for every `<root>/<task>/adapter_config.json`."""
    if not os.path.isdir(root):
        raise AdapterError(f"Adapters directory {root} does not exist; pass a directory of <task>/ adapter folders.")
    return {
        entry: os.path.join(root, entry)
        for entry in sorted(os.listdir(root))
        if os.path.isfile(os.path.join(root, entry, CONFIG_NAME))
    }
