"""The paper's named bias terms per architecture: which module path holds which bias, and fused-QKV slices.

Rules match a module's own path, anchored at a layer boundary, so `output` never matches `attention.output.dense`.
Fused projections (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`) map a term to the positions of its slice of the
fused bias. Target selection itself (`targets.select_targets`) uses these tables; this module only describes
architectures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import layer_types
from .constants import BIAS_TERMS
from .layer_types import base_of

__all__ = ["ARCHITECTURES", "BIAS_TERMS", "TASK_HEADS", "Rule", "classify_module", "matches", "slice_positions"]

# Heads peft trains whole (ModulesToSaveWrapper) for each task type. peft adds them to modules_to_save itself, but for
# TOKEN_CLS and QUESTION_ANS only after the tuner has injected its layers, so BitFit must leave them alone up front.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


@dataclass(frozen=True)
class Rule:
    """A module-path pattern for one bias term; `part` picks a slice (0 = q, 1 = k, 2 = v) of a fused QKV bias."""

    pattern: str
    part: int | None = None
    per_head: bool = False  # fused layout [head][q, k, v][head_dim] (GPT-NeoX) instead of [q; k; v] (GPT-2)


def _rules(**terms: str | list[Rule]) -> dict[str, list[Rule]]:
    return {t: [Rule(v)] if isinstance(v, str) else v for t, v in terms.items()}


_BERT = _rules(
    query=r"attention\.self\.query",
    key=r"attention\.self\.key",
    value=r"attention\.self\.value",
    attention_output=r"attention\.output\.dense",
    intermediate=r"intermediate\.dense",
    output=r"layer\.\d+\.output\.dense",
)
_DEBERTA = {**_BERT, **_rules(query=r"self\.query_proj", key=r"self\.key_proj", value=r"self\.value_proj")}
_DISTILBERT = _rules(
    query=r"attention\.q_lin",
    key=r"attention\.k_lin",
    value=r"attention\.v_lin",
    attention_output=r"attention\.out_lin",
    intermediate=r"ffn\.lin1",
    output=r"ffn\.lin2",
)
_GPT2 = _rules(
    query=[Rule(r"attn\.c_attn", part=0)],
    key=[Rule(r"attn\.c_attn", part=1)],
    value=[Rule(r"attn\.c_attn", part=2)],
    attention_output=r"attn\.c_proj",
    intermediate=r"mlp\.c_fc",
    output=r"mlp\.c_proj",
)
_GPT_NEOX = _rules(
    query=[Rule(r"attention\.query_key_value", part=0, per_head=True)],
    key=[Rule(r"attention\.query_key_value", part=1, per_head=True)],
    value=[Rule(r"attention\.query_key_value", part=2, per_head=True)],
    attention_output=r"attention\.dense",
    intermediate=r"mlp\.dense_h_to_4h",
    output=r"mlp\.dense_4h_to_h",
)
_BART = _rules(  # also OPT (decoder-only, no encoder_attn)
    query=r"(?:self_attn|encoder_attn)\.q_proj",
    key=r"(?:self_attn|encoder_attn)\.k_proj",
    value=r"(?:self_attn|encoder_attn)\.v_proj",
    attention_output=r"(?:self_attn|encoder_attn)\.out_proj",
    intermediate=r"layers\.\d+\.fc1",
    output=r"layers\.\d+\.fc2",
)
_LLAMA = _rules(
    query=r"self_attn\.q_proj",
    key=r"self_attn\.k_proj",
    value=r"self_attn\.v_proj",
    attention_output=r"self_attn\.o_proj",
    intermediate=r"mlp\.(?:gate_proj|up_proj)",
    output=r"mlp\.down_proj",
)
_T5 = _rules(
    query=r"(?:SelfAttention|EncDecAttention)\.q",
    key=r"(?:SelfAttention|EncDecAttention)\.k",
    value=r"(?:SelfAttention|EncDecAttention)\.v",
    attention_output=r"(?:SelfAttention|EncDecAttention)\.o",
    intermediate=r"DenseReluDense\.wi(?:_0|_1)?",
    output=r"DenseReluDense\.wo",
)
_VIT = _rules(
    query=r"attention\.q_proj",
    key=r"attention\.k_proj",
    value=r"attention\.v_proj",
    attention_output=r"attention\.o_proj",
    intermediate=r"mlp\.fc1",
    output=r"mlp\.fc2",
)

# transformers `config.model_type` -> bias term -> rules. `layernorm` is structural (every norm with a bias).
ARCHITECTURES: dict[str, dict[str, list[Rule]]] = {
    **dict.fromkeys(["bert", "roberta", "electra", "xlm-roberta", "camembert"], _BERT),
    **dict.fromkeys(["deberta", "deberta-v2"], _DEBERTA),
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    **dict.fromkeys(["bart", "mbart", "opt"], _BART),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma"], _LLAMA),
    **dict.fromkeys(["t5", "mt5"], _T5),
    "vit": _VIT,
}


def matches(rule: Rule, key: str) -> bool:
    """Whether the module at `key` is one the rule describes."""
    return re.search(rf"(?:^|\.){rule.pattern}$", key) is not None


def slice_positions(rule: Rule, size: int, model_config: dict[str, Any]) -> list[int]:
    """Positions of a fused QKV bias (of `size` entries) that belong to `rule.part`."""
    part = rule.part or 0
    if not rule.per_head:
        third = size // 3
        return list(range(part * third, (part + 1) * third))
    heads = model_config.get("num_attention_heads")
    if not heads or size % (3 * heads):
        raise ValueError(
            f"Cannot split a fused QKV bias of {size} entries into {heads} heads; "
            "use target_modules to train the whole fused bias."
        )
    head_dim = size // (3 * heads)
    return [h * 3 * head_dim + part * head_dim + i for h in range(heads) for i in range(head_dim)]


def classify_module(model_type: str | None, module_name: str, module: nn.Module | None = None) -> str | None:
    """The bias term a module belongs to (`"query"`, ..., `"layernorm"`), `"qkv"` for a fused projection, or None.

    Example:

    >>> classify_module("bert", "bert.encoder.layer.3.attention.output.dense")
    'attention_output'
    """
    if module is not None and isinstance(base_of(module), layer_types.NORM_TYPES):
        return "layernorm"
    terms = [
        t
        for t, rules in ARCHITECTURES.get(model_type or "", {}).items()
        if any(matches(r, module_name) for r in rules)
    ]
    if len(terms) > 1:
        return "qkv"
    if terms:
        return terms[0]
    if module is None and re.search(r"(?:layer_?norm|LayerNorm|ln_\w+)$", module_name):
        return "layernorm"
    return None
