"""How far each bias moved: per-layer, per-term change of the trained biases (the paper's Figure 1).

Ben Zaken et al. plot, for each layer and bias term, the change of the bias normalised by its size,
`||b_F - b_0||_1 / dim(b)`, and find that the query bias `b_q` and the intermediate (MLP up-projection) bias
`b_m2` move most. `bias_changes` reads that from a BitFit model (each `BitFitLayer`'s delta *is* `b_F - b_0`);
`bias_changes_from_state_dicts` does it for any two state dicts (e.g. before and after full fine-tuning), and
`change_matrix` arranges either as a terms x layers array for a heatmap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .architectures import classify_module
from .constants import BIAS_TERMS, strip_peft_prefix
from .layer import BitFitLayer

__all__ = ["BiasChange", "bias_changes", "bias_changes_from_state_dicts", "bias_deltas", "change_matrix"]

NORMS = ("l1", "rms")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class BiasChange:
    """The change of one bias vector.

    Args:
        module_name (`str`): Module path in the base model, e.g. `"bert.encoder.layer.0.attention.self.query"`.
        term (`str | None`): Bias term (`"query"`, ..., `"layernorm"`, `"qkv"` for a fused projection), or
            `None` for a bias outside the named terms (pooler, classifier, ...).
        layer (`int | None`): Index of the transformer block, `None` outside the blocks (embeddings, head).
        value (`float`): The normalised change (see `normalised_change`).
        numel (`int`): Number of bias entries.
    """

    module_name: str
    term: str | None
    layer: int | None
    value: float
    numel: int


def normalised_change(delta: torch.Tensor, norm: str = "l1") -> float:
    """`||delta||_1 / dim` (`"l1"`, the paper's measure) or `||delta||_2 / sqrt(dim)` (`"rms"`)."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm '{norm}'. Must be one of {NORMS}.")
    d = delta.detach().float().flatten()
    if d.numel() == 0:
        return 0.0
    if norm == "l1":
        return float(d.abs().mean())
    return float(d.pow(2).mean().sqrt())


def layer_index(module_name: str) -> int | None:
    """The block index in a module path: the first all-digit component (`encoder.layer.3.output` gives 3)."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    get_base_model = getattr(model, "get_base_model", None)
    if config is None and callable(get_base_model):
        config = getattr(get_base_model(), "config", None)
    return getattr(config, "model_type", None)


def bias_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The trained bias deltas of a BitFit model, keyed by module path in the base model.

    Args:
        model (`nn.Module`): A `PeftModel` (or its `base_model`) with BitFit layers.
        adapter_name (`str`, defaults to `"default"`): The adapter to read.

    Returns:
        `dict[str, torch.Tensor]`: module path to its full-size delta (zeros outside a fused slice), on CPU.

    Raises:
        `ValueError`: the model has no BitFit layer holding `adapter_name`.
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta:
            out[strip_peft_prefix(name)] = module.full_delta(adapter_name).detach().float().cpu()
    if not out:
        raise ValueError(
            f"No BitFit layer with adapter '{adapter_name}' in this model. Pass a model made by get_peft_model with "
            "a BitFitConfig (or PeftModel.from_pretrained of a BitFit adapter) and an adapter name it holds."
        )
    return out


def bias_changes(model: nn.Module, adapter_name: str = "default", norm: str = "l1") -> list[BiasChange]:
    """Normalised change of every bias a BitFit adapter trains, with its term and layer.

    Args:
        model (`nn.Module`): A `PeftModel` with BitFit layers.
        adapter_name (`str`, defaults to `"default"`): The adapter to read.
        norm (`str`, defaults to `"l1"`): `"l1"` (`||Δb||_1 / dim`, as in the paper) or `"rms"`.

    Example:

        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from peft import get_peft_model
        >>> from bitfit_peft import BitFitConfig
        >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
        >>> model = get_peft_model(BertForSequenceClassification(cfg), BitFitConfig(task_type="SEQ_CLS"))
        >>> changes = bias_changes(model)  # all zero before training
        >>> sorted({c.term for c in changes if c.layer == 0})
        ['attention_output', 'intermediate', 'key', 'layernorm', 'output', 'query', 'value']
    """
    model_type = _model_type(model)
    modules = {strip_peft_prefix(n): m for n, m in model.named_modules() if isinstance(m, BitFitLayer)}
    return [
        BiasChange(name, classify_module(model_type, name, modules[name]), layer_index(name), normalised_change(d, norm), d.numel())
        for name, d in bias_deltas(model, adapter_name).items()
    ]  # fmt: skip


def bias_changes_from_state_dicts(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], model_type: str | None, norm: str = "l1"
) -> list[BiasChange]:
    """Normalised change of every `*.bias` present in both state dicts (e.g. before and after full fine-tuning).

    Args:
        before (`Mapping[str, torch.Tensor]`): State dict at initialisation.
        after (`Mapping[str, torch.Tensor]`): State dict after training (same architecture).
        model_type (`str | None`): The `config.model_type` used to name the terms (e.g. `"bert"`).
        norm (`str`, defaults to `"l1"`): `"l1"` or `"rms"`.

    Raises:
        `ValueError`: the two state dicts share no bias, or a shared bias changed shape.
    """
    changes = []
    for key, b0 in before.items():
        if not key.endswith(".bias") or key not in after:
            continue
        if after[key].shape != b0.shape:
            raise ValueError(f"Bias '{key}' has shape {tuple(b0.shape)} before and {tuple(after[key].shape)} after.")
        name = key[: -len(".bias")]
        delta = after[key].detach().float().cpu() - b0.detach().float().cpu()
        changes.append(BiasChange(name, classify_module(model_type, name), layer_index(name), normalised_change(delta, norm), b0.numel()))  # fmt: skip
    if not changes:
        raise ValueError("The two state dicts share no '*.bias' entry: pass state dicts of the same model.")
    return changes


def change_matrix(
    changes: list[BiasChange], terms: tuple[str, ...] | None = None
) -> tuple[tuple[str, ...], list[int], np.ndarray]:
    """Arrange per-module changes as a terms x layers matrix (the Figure-1 heatmap).

    Biases outside the transformer blocks (no layer index) or outside the named terms are left out; a term
    with several modules in one layer (two LayerNorms per BERT block) gets their mean; a missing cell is NaN.

    Args:
        changes (`list[BiasChange]`): From `bias_changes` or `bias_changes_from_state_dicts`.
        terms (`tuple[str, ...] | None`): Row order; `None` uses the known terms that occur, in `BIAS_TERMS` order.

    Returns:
        `tuple[tuple[str, ...], list[int], np.ndarray]`: row terms, column layer indices, the matrix.
    """
    cells: dict[tuple[str, int], list[float]] = {}
    for c in changes:
        if c.layer is not None and c.term is not None:
            cells.setdefault((c.term, c.layer), []).append(c.value)
    if terms is None:
        present = {t for t, _ in cells}
        terms = tuple(t for t in (*BIAS_TERMS, "qkv") if t in present)
    layers = sorted({layer for _, layer in cells})
    matrix = np.full((len(terms), len(layers)), np.nan)
    for (term, layer), values in cells.items():
        if term in terms:
            matrix[terms.index(term), layers.index(layer)] = float(np.mean(values))
    return terms, layers, matrix
