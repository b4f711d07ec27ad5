"""Names every other module agrees on: the peft type, the parameter prefix, checkpoint key spellings, bias terms.

This is the bottom of the package: it imports nothing from it. The import order reads one way, from here up:
constants <- compact <- files <- card, fingerprint (layer_types, architectures beside them) <- config, targets, routing
<- layer <- router <- loading <- model <- registration <- `__init__`; cli and serving sit on top.
"""

from __future__ import annotations

import enum
import re

PEFT_TYPE_NAME = "BITFIT"
# Parameter prefix peft filters checkpoint keys by; the per-adapter deltas live in `<module>.bitfit_delta.<name>`.
PREFIX = "bitfit_"
DELTA_ATTR = f"{PREFIX}delta"
INDEX_ATTR = f"{PREFIX}index"
# The prefix peft puts before every key of a PeftModel's state dict (and of its checkpoints).
PEFT_KEY_PREFIX = "base_model.model."
# The name that means "no adapter" in a mixed-task batch.
BASE = "__base__"
# The paper's named bias subsets, with the same meaning on every supported architecture.
BIAS_TERMS = ("query", "key", "value", "attention_output", "intermediate", "output", "layernorm")
# A checkpoint key: dotted names of letters, digits, `_` and `-`; no `/`, `\\`, empty parts (`..`) or outer dots.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
# The two files of a saved adapter, as peft names them, and the model card and metrics written beside them.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
METRICS_NAME = "eval_results.json"


class BitFitPeftType(str, enum.Enum):
    """The `peft_type` of BitFit adapters, stored as `"BITFIT"` in adapter_config.json."""

    BITFIT = PEFT_TYPE_NAME

    def __str__(self) -> str:
        return self.value


def strip_peft_prefix(key: str) -> str:
    """A checkpoint or state-dict key without peft's `base_model.model.` prefix.

    Example:

    >>> strip_peft_prefix("base_model.model.bert.pooler.dense.bitfit_delta")
    'bert.pooler.dense.bitfit_delta'
    """
    return key.removeprefix(PEFT_KEY_PREFIX)


def delta_key(module_key: str) -> str:
    """The checkpoint key of the delta of the module at `module_key` (adapter name removed, peft prefix stripped).

    Example:

    >>> delta_key("base_model.model.bert.encoder.layer.0.attention.self.query")
    'bert.encoder.layer.0.attention.self.query.bitfit_delta'
    """
    return f"{strip_peft_prefix(module_key)}.{DELTA_ATTR}"


def is_delta_key(key: str) -> bool:
    """Whether a state-dict key holds a BitFit delta (with or without the adapter name after it)."""
    return f".{DELTA_ATTR}" in key
