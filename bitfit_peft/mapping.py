"""Which modules hold which bias: the paper's named bias terms per architecture, and target selection.

Modules are picked by structure: by type (`nn.Linear`, transformers' `Conv1D`, `nn.Conv*d`, `nn.LayerNorm`,
`nn.GroupNorm`), by whether they have a bias, and, for named terms, by the module's own path in the architecture
(anchored at a layer boundary, so `output` never matches `attention.output.dense`). Fused projections (GPT-2's
`c_attn`, GPT-NeoX's `query_key_value`) map a term to the positions of its slice of the fused bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from .config import BitFitConfig

BIAS_TERMS = ("query", "key", "value", "attention_output", "intermediate", "output", "layernorm")
# Layer types whose bias BitFit can train; the forward of each folds the delta into the op's bias argument.
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    Conv1D,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)
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


def _match(rule: Rule, key: str) -> bool:
    return re.search(rf"(?:^|\.){rule.pattern}$", key) is not None


def base_of(module: nn.Module) -> nn.Module:
    """The layer a BitFit wrapper (or any peft tuner layer) wraps, or the module itself."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def bias_shape(module: nn.Module) -> tuple[int, ...]:
    """Shape of the layer's bias, or of the bias it would have (for `add_missing_bias`)."""
    layer: Any = base_of(module)
    if getattr(layer, "bias", None) is not None:
        return tuple(layer.bias.shape)
    if isinstance(layer, nn.Linear):
        return (layer.out_features,)
    if isinstance(layer, Conv1D):
        return (layer.nf,)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (layer.out_channels,)
    if isinstance(layer, nn.LayerNorm):
        return tuple(layer.normalized_shape)
    if isinstance(layer, nn.GroupNorm):
        return (layer.num_channels,)
    raise TypeError(f"BitFit cannot train a bias of {type(layer).__name__}")


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
    if module is not None and isinstance(base_of(module), NORM_TYPES):
        return "layernorm"
    terms = [
        t for t, rules in ARCHITECTURES.get(model_type or "", {}).items() if any(_match(r, module_name) for r in rules)
    ]
    if len(terms) > 1:
        return "qkv"
    if terms:
        return terms[0]
    if module is None and re.search(r"(?:layer_?norm|LayerNorm|ln_\w+)$", module_name):
        return "layernorm"
    return None


def _is_candidate(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    base = base_of(module)
    # nn.MultiheadAttention reads out_proj.weight/.bias directly instead of calling its forward: a wrapper there
    # would be silently ignored, so it is never a target.
    return isinstance(base, SUPPORTED_TYPES) and not isinstance(parent, nn.MultiheadAttention)


def _has_bias(module: nn.Module) -> bool:
    return getattr(base_of(module), "bias", None) is not None


def _under_head(key: str, heads: set[str]) -> bool:
    """Whether the module or one of its parents is a head peft wraps whole: peft matches `path.endswith(name)`
    (plain suffix, so DistilBERT's `pre_classifier` is a head too)."""
    parts = key.split(".")
    return any(".".join(parts[: i + 1]).endswith(h) for i in range(len(parts)) for h in heads)


def _passes_filters(config: BitFitConfig, key: str) -> bool:
    """exclude_modules, modules_to_save and layers_to_transform with peft's own semantics."""
    probe = SimpleNamespace(
        target_modules=[key.rsplit(".", 1)[-1]],
        target_parameters=None,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    return bool(check_target_module_exists(probe, key))


def select_targets(
    model: nn.Module, config: BitFitConfig, model_config: dict[str, Any]
) -> dict[str, list[int] | None]:
    """Map each module to target to the bias positions its delta covers (None: the whole bias).

    Raises:
        ValueError: the config selects nothing (with candidate module names), or `bias_terms` is used on an
            architecture without a mapping.
    """
    model_type = model_config.get("model_type")
    rules = None
    if config.bias_terms is not None:
        rules = ARCHITECTURES.get(model_type or "")
        if rules is None and set(config.bias_terms) != {"layernorm"}:
            raise ValueError(
                f"bias_terms={sorted(config.bias_terms)} needs a known architecture, but model_type {model_type!r} "
                f"has no BitFit mapping (known: {sorted(ARCHITECTURES)}). Pass target_modules=[...] with the module "
                "names instead, e.g. the names listed by model.named_modules()."
            )
    heads = set(config.modules_to_save or ()) | set(TASK_HEADS.get(config.task_type or "", ()))
    skip_under: list[str] = []
    selected: dict[str, list[int] | None] = {}
    without_bias: list[str] = []
    parents: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        if any(key.startswith(p) for p in skip_under):
            continue
        for child_name, _child in module.named_children():
            parents[f"{key}.{child_name}" if key else child_name] = module
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            skip_under.append(key + ".")  # never look inside an adapter wrapper or a saved head
        if not key or not _is_candidate(key, module, parents.get(key)) or _under_head(key, heads):
            continue
        positions: list[int] | None = None
        if config.target_modules is not None:
            if not check_target_module_exists(config, key):
                continue
        else:
            if not _passes_filters(config, key):
                continue
            if config.bias_terms is not None:
                wanted = set(config.bias_terms)
                if "layernorm" in wanted and isinstance(base_of(module), NORM_TYPES):
                    pass
                else:
                    hits = [r for t in wanted - {"layernorm"} for r in (rules or {}).get(t, []) if _match(r, key)]
                    if not hits:
                        continue
                    if all(r.part is not None for r in hits):
                        size = bias_shape(module)[0]
                        positions = sorted({p for r in hits for p in slice_positions(r, size, model_config)})
                        if len(positions) == size:
                            positions = None
        if not (_has_bias(module) or config.add_missing_bias):
            without_bias.append(key)
            continue
        selected[key] = positions
    if not selected:
        raise ValueError(_nothing_selected_message(model, config, model_type, without_bias))
    return selected


def _nothing_selected_message(
    model: nn.Module, config: BitFitConfig, model_type: str | None, without_bias: list[str]
) -> str:
    what = (
        f"target_modules={config.target_modules!r}"
        if config.target_modules is not None
        else f"bias_terms={sorted(config.bias_terms)}"
        if config.bias_terms is not None
        else "the default (every bias)"
    )
    msg = f"BitFitConfig with {what} selected no module of {type(model).__name__} (model_type={model_type!r})."
    if without_bias:
        return (
            f"{msg} {len(without_bias)} matching modules have no bias (e.g. {without_bias[:4]}): set "
            "add_missing_bias=True to give them a zero-initialised delta."
        )
    candidates = [k for k, m in model.named_modules() if k and isinstance(m, SUPPORTED_TYPES) and _has_bias(m)]
    return (
        f"{msg} Modules with a bias include {candidates[:6]}. Check target_modules / bias_terms / exclude_modules / "
        "layers_to_transform / modules_to_save."
    )
