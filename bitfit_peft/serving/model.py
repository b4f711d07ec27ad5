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
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

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
    model = model.to(device).eval()
    if generator:
        skinny_linears(model)
    return model


def skinny_linears(model: nn.Module) -> None:
    """Replace every plain `nn.Linear` of `model` by a `SkinnyLinear` sharing its parameters: up to 4 rows for the
    layers, 8 for the output head (measured: docs/serving.md, "Decode on a CPU")."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    found = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in found:
        parent, _, leaf = _get_submodules(model, name)
        setattr(parent, leaf, SkinnyLinear.of(module, 8 if module is head else 4))


class SkinnyLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) whose product for a few rows of float32 on the CPU is
    computed as `weight @ x.T`: the same sums in another order, but MKL's kernel for that layout is much faster for
    1-4 rows (one row is duplicated: MKL's two-row kernel beats its one-row GEMV). With 2 rows and 2 threads, idle
    (`python -m benchmarks.decode_cost`, docs/serving.md): SmolLM2-135M's 49,152 x 576 head 29.3 ms as
    `x @ weight.T`, 6.2 ms as `weight @ x.T`; its layers' 120 weights of 1536 x 576 and 576 x 1536, 68.3 ms against
    30.6 ms. Beyond 4 rows (8 for the head) it gains little or loses (a first run: the head with 16 rows 29.8
    against 27.4 ms), so larger inputs, other devices and dtypes, and calls with gradients run
    `torch.nn.functional.linear`.

    Example:

    >>> head = SkinnyLinear.of(nn.Linear(8, 5))
    >>> x = torch.randn(2, 8)
    >>> torch.allclose(head(x), x @ head.weight.T + head.bias, atol=1e-6)
    True
    """

    max_rows = 4

    @classmethod
    def of(cls, linear: nn.Linear, max_rows: int = 4) -> SkinnyLinear:
        """A `SkinnyLinear` sharing `linear`'s weight and bias (tied weights stay tied), for up to `max_rows`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.max_rows = linear.in_features, linear.out_features, max_rows
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        w = self.weight
        if rows > self.max_rows or x.device.type != "cpu" or w.dtype != torch.float32 or torch.is_grad_enabled():
            return nn.functional.linear(x, w, self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:
            flat = torch.cat([flat, flat])
        out = torch.mm(w, flat.t()).t()[:rows].contiguous()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


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
