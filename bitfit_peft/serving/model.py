"""The served model: one base with BitFit layers on the union of the adapters' targets, and per-task heads.

`build_base` loads the base once (a sequence classifier, or a causal LM for generation). `wrap_layers` puts a
`BitFitLayer` with no adapter of its own on each targeted module: its mixed-batch path reads the store's tables.
`TaskHeads` replaces each task-head module (`classifier`, `score`, DistilBERT's `pre_classifier`): in a mixed call
it runs each task's own head on that task's rows. Tasks' heads may differ in shape (2 labels, 6 labels, one
regression output); outputs are zero-padded to the widest head in the call and the store slices each row back.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.utils import _get_submodules
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..heads import MeanPooledSequenceClassifier, uses_mean_pooling
from ..layer import BitFitLayer
from ..routing import current_mixed_batch, route_heads
from .adapters import AdapterError

HEAD_NAMES = ("pre_classifier", "classifier", "score")
_PLACEHOLDER = "_serving"


MEAN_POOLING_HEAD = {"classifier.out_proj.weight", "classifier.out_proj.bias"}


def mean_pooling_head(head_keys: set[str] | None, base: str) -> bool:
    """Whether adapters were trained with `MeanPooledSequenceClassifier` (their head is exactly a `MeanPoolingHead`);
    without adapters to look at, whether the base is a sentence-transformers checkpoint (mean pooling)."""
    return head_keys == MEAN_POOLING_HEAD if head_keys is not None else uses_mean_pooling(base)


def build_base(base: str, generator: bool, dtype: torch.dtype, device: str, mean_pooling: bool = False) -> nn.Module:
    """Load the base model for serving, frozen, in eval mode: a causal LM, a `MeanPooledSequenceClassifier`
    (`mean_pooling`), or the architecture's own `*ForSequenceClassification`."""
    model: nn.Module
    if generator:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    elif mean_pooling:
        model = MeanPooledSequenceClassifier.from_pretrained(base, num_labels=1, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, ignore_mismatched_sizes=True, dtype=dtype
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def wrap_layers(model: nn.Module, keys: list[str]) -> dict[str, BitFitLayer]:
    """A `BitFitLayer` without adapters on each module in `keys` (already wrapped ones are kept); all of them."""
    for key in keys:
        module = model.get_submodule(key)
        if isinstance(module, BitFitLayer):
            continue
        parent, _, name = _get_submodules(model, key)
        layer = BitFitLayer(module, _PLACEHOLDER)
        del layer.bitfit_delta[_PLACEHOLDER]
        layer._active_adapter = []
        layer._grad_on = set()
        setattr(parent, name, layer)
    return {k: m for k, m in model.named_modules() if isinstance(m, BitFitLayer)}


class TaskHeads(nn.Module):
    """Routes each row of a mixed call through its task's head; outside a mixed call, the base head.

    Args:
        original (`nn.Module`): the base model's head module.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = current_mixed_batch()
        if mixed is None:
            return self.original(x, *args, **kwargs)
        return route_heads(mixed, mixed.routing.heads.get(self, {}), self.original, x, args, kwargs, pad=True)


def wrap_heads(model: nn.Module) -> dict[str, TaskHeads]:
    """Replace each top-level task-head module with a `TaskHeads` router; name -> router."""
    routers: dict[str, TaskHeads] = {}
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, TaskHeads):
            routers[name] = module
        elif isinstance(module, nn.Module):
            routers[name] = TaskHeads(module)
            setattr(model, name, routers[name])
    return routers


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of a module tree that shares nothing mutable with it (own parameter, buffer and child dicts) but
    copies no tensor: 100x cheaper than `copy.deepcopy` for a head whose parameters are replaced anyway. Each task
    gets its own module rather than swapping parameters into the shared one per call (`torch.func.functional_call`
    does that, and two threads would then run each other's parameters)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else _skeleton(m) for k, m in module._modules.items()}
    return new


def task_head(router: TaskHeads, name: str, state: dict[str, torch.Tensor], where: str) -> tuple[nn.Module, int]:
    """A copy of the base head `name` holding an adapter's parameters (`state`: path below the head -> tensor),
    checked against the head, and its number of outputs (rows of its last weight matrix in module order: the
    task's labels).

    The last layer may have any number of outputs; every input size must match the base's.
    """
    expected = dict(router.original.named_parameters())
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{where}: its head {name!r} has parameters {sorted(state)} but the base model's head has "
            f"{sorted(expected)}; train the adapter on this base model's architecture (and pooling)."
        )
    head = _skeleton(router.original)
    for path, value in state.items():
        base = expected[path]
        if value.dim() != base.dim() or (value.dim() == 2 and value.shape[1] != base.shape[1]):
            raise AdapterError(
                f"{where}: head parameter {name}.{path} has shape {tuple(value.shape)} but this base's head needs "
                f"{tuple(base.shape[1:])} inputs; the adapter was trained on another base model."
            )
        owner_path, _, leaf = path.rpartition(".")
        owner = head.get_submodule(owner_path) if owner_path else head
        owner._parameters[leaf] = nn.Parameter(value.to(base.device, base.dtype), requires_grad=False)
    weights = [state[p] for p in expected if state[p].dim() == 2]
    if not weights:
        raise AdapterError(f"{where}: its head {name!r} has no weight matrix; it cannot be served.")
    return head, int(weights[-1].shape[0])
