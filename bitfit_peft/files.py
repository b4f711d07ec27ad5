"""Adapter files on disk: checks that run before anything touches a model.

This module sits at the bottom of the package (config uses it), so it reads files only; checks against a model's
modules live in `loading`.
"""

from __future__ import annotations

import os

from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

__all__ = ["check_adapter_file"]


def check_adapter_file(directory: str) -> None:
    """Check that the adapter weights in `directory` can be read, so a broken file fails before the model changes.

    Raises:
        ValueError: the safetensors file is truncated, corrupt or holds non-floating-point tensors.
    """
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
            return  # legacy pickle checkpoint: peft reads it with weights_only=True
        raise ValueError(
            f"No adapter weights in {directory}: expected {SAFETENSORS_WEIGHTS_NAME} next to adapter_config.json "
            "(written by model.save_pretrained)."
        )
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point():
                    raise ValueError(f"tensor {key} has dtype {tensor.dtype}, expected floating point")
    except Exception as err:  # safetensors raises its own error types for truncated headers and data
        raise ValueError(
            f"Adapter file {path} is not a valid safetensors checkpoint ({err}). It may be truncated or corrupt: "
            "save the adapter again with model.save_pretrained()."
        ) from err
