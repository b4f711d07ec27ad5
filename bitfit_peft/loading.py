"""Loading checks and in-place hotswap: everything that compares a checkpoint with the model it goes into.

One helper each: `expected_deltas` (which delta keys an adapter has in this model), `check_against_model` (the first
mismatch between a checkpoint and the model, before any value is written), `check_fingerprint` (is this the base the
adapter was saved from), `abort_load` (undo a failed load exactly), the checks for adapters injected outside a
PeftModel (transformers' `load_adapter`, which reads tensors by name and never calls peft's hooks) and
`hotswap_adapter`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import _delete_auxiliary_adapter
from peft.utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from . import compact
from .config import BitFitConfig, read_config
from .constants import CONFIG_NAME, PEFT_KEY_PREFIX, delta_key, is_delta_key, strip_peft_prefix
from .files import check_adapter_file, current_policy
from .fingerprint import fingerprint, target_modules_of
from .layer import BitFitLayer
from .router import router_for

__all__ = [
    "abort_load",
    "check_against_model",
    "check_fingerprint",
    "decode_for_model",
    "expected_deltas",
    "hotswap_adapter",
    "check_injected_fingerprint",
    "refuse_packed_outside_peft",
    "remember_requires_grad",
]

# Base model -> requires_grad of its parameters before the first BitFit injection, to undo a failed load exactly.
_REQUIRES_GRAD_BEFORE: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def remember_requires_grad(model: nn.Module) -> None:
    """Record the base model's requires_grad flags before its first BitFit injection (see `abort_load`)."""
    if not any(isinstance(m, BitFitLayer) for m in model.modules()):
        _REQUIRES_GRAD_BEFORE[model] = {n: p.requires_grad for n, p in model.named_parameters()}


def expected_deltas(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint key (peft prefix stripped, adapter name removed) -> the adapter's delta Parameter in `model`.

    Walks the modules rather than `model.state_dict()`, whose size grows with every resident adapter.
    """
    return {
        delta_key(key): module.bitfit_delta[adapter_name]
        for key, module in model.named_modules()
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta
    }


def check_against_model(model: nn.Module, adapter_name: str, remapped: dict[str, torch.Tensor]) -> str | None:
    """Describe the first mismatch between a (remapped) checkpoint and the adapter just injected, or None."""
    expected = {f"{k}.{adapter_name}": v for k, v in expected_deltas(model, adapter_name).items()}
    loaded = {strip_peft_prefix(k): v for k, v in remapped.items()}
    unexpected = sorted(k for k in loaded if is_delta_key(k) and k not in expected)
    missing = sorted(k for k in expected if k not in loaded)
    if unexpected:
        return f"unexpected keys for modules this config does not target: {unexpected[:3]}"
    if missing:
        return f"missing deltas for modules {[k.split('.bitfit_delta', 1)[0] for k in missing[:3]]}"
    for key, value in loaded.items():
        target: torch.Tensor | None = expected.get(key)
        if target is None:  # a task head or other saved module: look it up by name
            for candidate in (key, PEFT_KEY_PREFIX + key):
                with contextlib.suppress(AttributeError):
                    target = model.get_parameter(candidate)
                    break
        if target is not None and tuple(value.shape) != tuple(target.shape):
            return (
                f"{key.removesuffix('.' + adapter_name)} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target.shape)} in the model; the checkpoint comes from another base model"
            )
        if key in expected and not value.is_floating_point():
            return f"{key} has dtype {value.dtype}; deltas must be floating point"
    return None


def decode_for_model(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack a packed checkpoint (`compact.decode`) and cast each delta to the dtype of the adapter's delta in
    `model`; a state dict that is not packed comes back as it is (loading casts it)."""
    if not compact.is_packed(state):
        return state
    decoded = compact.decode(state)
    dtypes = {k: p.dtype for k, p in expected_deltas(model, adapter_name).items()}
    return {k: v.to(dtypes.get(strip_peft_prefix(k), v.dtype)) if is_delta_key(k) else v for k, v in decoded.items()}


def check_fingerprint(model: nn.Module, config: Any, delta_keys: list[str]) -> str | None:
    """Compare the base model's fingerprint with the one the adapter recorded at save time.

    Returns the mismatch message when the policy (`files.load_policy`) says raise; warns and returns None otherwise.
    Silent when they match, when the adapter recorded none (older adapters) or when adapters are merged (the base
    weights cannot be read then).
    """
    recorded = getattr(config, "base_fingerprint", None)
    if not recorded:
        return None
    try:
        actual = fingerprint(model, target_modules_of(delta_keys))
    except ValueError:
        return None  # merged adapters, or targets the structural check reports with a better message
    if actual == recorded:
        return None
    base = getattr(config, "base_model_name_or_path", None) or "an unnamed base model"
    message = (
        f"This adapter was saved from {base} (base fingerprint {recorded}), but the model it is loaded onto has "
        f"fingerprint {actual}: the weights differ, so its outputs will not be the ones it was trained for. Load it "
        f"onto {base}, or check a base with `bitfit-peft verify ADAPTER --base MODEL`."
    )
    if current_policy().on_fingerprint_mismatch == "error":
        return message
    warnings.warn(
        message + ' To make this an error: bitfit_peft.files.load_policy(on_fingerprint_mismatch="error").',
        UserWarning,
        stacklevel=2,
    )
    return None


def refuse_packed_outside_peft(config: Any) -> None:
    """Refuse to inject an adapter whose file is packed outside peft's loaders (before anything is touched).

    transformers' `model.load_adapter` injects through peft's `inject_adapter_in_model` and then reads the weights
    file by key name, without peft's set_peft_model_state_dict: a packed file (`bitfit_packed`, `bitfit_layout`) would
    leave the deltas at their initial values with only a log line. The config records the layout at save time.
    """
    if getattr(config, "packed", None):
        raise ValueError(
            "This BitFit adapter is stored packed (save_dtype="
            f"{getattr(config, 'save_dtype', None)!r}, keep_fraction={getattr(config, 'keep_fraction', None)!r}): "
            "its deltas sit in one tensor that only peft's loaders decode, and transformers' model.load_adapter "
            "reads tensors by name. Load it with peft.PeftModel.from_pretrained(model, ADAPTER_DIR) (or "
            "AutoPeftModel*), or write a one-tensor-per-bias copy that transformers reads: "
            "`bitfit-peft convert ADAPTER_DIR OUT --to float32`. The model was not changed."
        )


def check_injected_fingerprint(model: nn.Module, adapter_name: str, config: Any) -> None:
    """The fingerprint check of `check_fingerprint` for an adapter injected by peft's `inject_adapter_in_model`
    (transformers' load_adapter); under the "error" policy the injection is undone and ValueError raised."""
    keys = list(expected_deltas(model, adapter_name))
    problem = check_fingerprint(model, config, keys)
    if problem:
        abort_load(model, adapter_name)
        raise ValueError(f"{problem} The model was left as it was.")


def abort_load(model: nn.Module, adapter_name: str) -> None:
    """Remove a just-injected adapter; when it was the only one, restore the original modules and flags."""
    layers = [(k, m) for k, m in model.named_modules() if isinstance(m, BitFitLayer)]
    heads = [(k, m) for k, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    peft_config: dict[str, Any] = getattr(model, "peft_config", {})
    if set(peft_config) - {adapter_name}:
        for _, layer in layers:
            if adapter_name in layer.bitfit_delta:
                layer.delete_adapter(adapter_name)
        tuner = getattr(model, "base_model", None)
        active = [a for a in getattr(tuner, "active_adapters", []) if a != adapter_name]
        _delete_auxiliary_adapter(model, adapter_name, new_active_adapters=active)
        peft_config.pop(adapter_name, None)
        return
    tuner = getattr(model, "base_model", None)
    inner: Any = tuner.model if tuner is not None and hasattr(tuner, "_selection") else model
    for key, module in layers:
        parent, _, name = _get_submodules(model, key)
        setattr(parent, name, module.get_base_layer())
    for key, head in heads:
        original = getattr(head, "original_module", None)
        if original is not None:
            parent, _, name = _get_submodules(model, key)
            setattr(parent, name, original)
    before = _REQUIRES_GRAD_BEFORE.pop(inner, None)
    if before:
        for name, param in inner.named_parameters():
            if name in before:
                param.requires_grad_(before[name])
    peft_config.pop(adapter_name, None)
    if "peft_config" in inner.__dict__:
        del inner.peft_config


def _load_state(model_id: str | dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    if isinstance(model_id, dict):
        return model_id
    from peft.utils import load_peft_weights

    check_adapter_file(model_id)
    return load_peft_weights(model_id, device=str(device))  # decoded by the caller


def _saved_config(model_id: str | dict[str, torch.Tensor]) -> BitFitConfig | None:
    """The config of a local adapter directory (its recorded fingerprint), or None for a state dict."""
    if not isinstance(model_id, str) or not os.path.isfile(os.path.join(model_id, CONFIG_NAME)):
        return None
    return read_config(model_id)


def hotswap_adapter(model: nn.Module, model_id: str | dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Replace the values of a loaded adapter in place, keeping the same Parameter objects.

    The swap is atomic for mixed-adapter calls running in other threads: it waits for the calls in flight, and
    every later call sees only the new values. Because the Parameters (and their shapes) stay the same, a model
    compiled with `torch.compile` does not recompile, and optimizers or mixed-batch tables that hold them see the
    new values. Everything is checked before the first write: on error the model is unchanged. A directory's
    recorded base fingerprint is checked as `PeftModel.from_pretrained` checks it (a warning, or a `ValueError`
    under `files.load_policy(on_fingerprint_mismatch="error")`).

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
    targets: dict[str, Any] = dict(expected_deltas(model, adapter_name))
    marker = f".modules_to_save.{adapter_name}."
    for key, param in model.named_parameters():
        if marker in key:
            targets[strip_peft_prefix(key.replace(marker, "."))] = param
    device = next(iter(targets.values())).device
    loaded = _load_state(model_id, device)
    if compact.is_packed(loaded):
        loaded = {k: v.to(device) for k, v in compact.decode(loaded).items()}  # cast by copy_ below
    state = {strip_peft_prefix(k): v for k, v in loaded.items()}
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
    saved = _saved_config(model_id)
    if saved is not None:
        problem = check_fingerprint(model, saved, [k for k in state if is_delta_key(k)])
        if problem:
            raise ValueError(f"Cannot hotswap adapter {adapter_name!r}: {problem} The model was left as it was.")
    # Under the model's writer lock: mixed calls in flight finish first, later ones see only the new values.
    tuner = getattr(model, "base_model", model)
    with router_for(tuner).lock.write(), torch.no_grad():
        for key, param in targets.items():
            param.copy_(state[key])
