"""Adapter files: integrity checks before anything is loaded, and in-place hotswap of a loaded adapter's values."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from .layer import BitFitLayer


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


def _load_state(model_id: str | dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    if isinstance(model_id, dict):
        return model_id
    from peft.utils import load_peft_weights

    check_adapter_file(model_id)
    return load_peft_weights(model_id, device=str(device))


def hotswap_adapter(model: nn.Module, model_id: str | dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Replace the values of a loaded adapter in place, keeping the same Parameter objects.

    Because the Parameters (and their shapes) stay the same, a `torch.compile`d model does not recompile, and
    optimizers or mixed-batch tables that hold them see the new values. Everything is checked before the first
    write: on error the model is unchanged.

    Args:
        model (`PeftModel`): a model with a BitFit adapter `adapter_name`.
        model_id (`str` or `dict`): a directory written by `save_pretrained`, or its state dict.
        adapter_name (`str`): the adapter whose values to replace.

    Example:

    >>> hotswap_adapter(peft_model, "adapters/sst2-v2", adapter_name="default")  # doctest: +SKIP
    """
    peft_config = getattr(model, "peft_config", {})
    if adapter_name not in peft_config:
        raise ValueError(f"No adapter {adapter_name!r} to hotswap; loaded adapters: {sorted(peft_config)}.")
    targets: dict[str, Any] = {}
    for key, module in model.named_modules():
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta:
            targets[f"{key}.bitfit_delta"] = module.bitfit_delta[adapter_name]
    for key, param in model.named_parameters():
        marker = f".modules_to_save.{adapter_name}."
        if marker in key:
            targets[key.replace(marker, ".")] = param
    device = next(iter(targets.values())).device
    state = {k.removeprefix("base_model.model."): v for k, v in _load_state(model_id, device).items()}
    targets = {k.removeprefix("base_model.model."): v for k, v in targets.items()}
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"Cannot hotswap adapter {adapter_name!r}: the new checkpoint targets other modules "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). Hotswap needs the same BitFitConfig; "
            "use load_adapter for a differently shaped adapter."
        )
    for key, param in targets.items():
        if state[key].shape != param.shape:
            raise ValueError(
                f"Cannot hotswap {key}: shape {tuple(state[key].shape)} in the checkpoint, {tuple(param.shape)} "
                "in the model."
            )
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(state[key])


__all__ = ["check_adapter_file", "hotswap_adapter"]
