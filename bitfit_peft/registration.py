"""Registration of BitFit with peft: its own `str` enum member and peft's type -> config/tuner/prefix mappings.

peft's `register_peft_method` accepts only names already in its closed `PeftType` enum. peft's mappings are plain
dicts keyed by `str`-enum members, and a `str` enum member hashes and compares like its value, so a plugin can use
its own member (`"BITFIT"` in adapter_config.json) and fill those dicts itself, leaving `PeftType` untouched.
"""

from __future__ import annotations

from typing import Any

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

from .config import BitFitConfig
from .constants import PEFT_TYPE_NAME, PREFIX, BitFitPeftType
from .model import BitFitModel

__all__ = ["BitFitPeftType", "register"]


def register() -> None:
    """Register BitFit with peft. Idempotent; refuses to overwrite another method holding the name or the prefix.

    Raises:
        ValueError: another PEFT method already uses the type name `BITFIT` or the parameter prefix `bitfit_`.
    """
    key = BitFitPeftType.BITFIT
    wanted: dict[str, tuple[dict[Any, Any], Any]] = {
        "config": (PEFT_TYPE_TO_CONFIG_MAPPING, BitFitConfig),
        "tuner": (PEFT_TYPE_TO_TUNER_MAPPING, BitFitModel),
        "prefix": (PEFT_TYPE_TO_PREFIX_MAPPING, PREFIX),
    }
    for what, (mapping, value) in wanted.items():
        current = mapping.get(key)
        # A re-import (e.g. importlib.reload) builds new class objects: accept ours by qualified name.
        if (
            current is not None
            and current != value
            and getattr(current, "__qualname__", None) != getattr(value, "__qualname__", object())
        ):
            raise ValueError(
                f"peft already has a {what} registered for peft_type {PEFT_TYPE_NAME!r}: {current!r}. "
                "Another plugin claims the name; uninstall it or import only one of them."
            )
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX and peft_type != key:
            raise ValueError(
                f"The adapter parameter prefix {PREFIX!r} is already used by peft_type {peft_type!r}; "
                "two methods cannot share a prefix (peft filters checkpoint keys by it)."
            )
    for mapping, value in wanted.values():
        mapping[key] = value
