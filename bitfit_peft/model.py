"""`BitFitModel`: the peft tuner that injects `BitFitLayer`s, routes mixed-task batches and checks checkpoints.

`BaseTuner` does injection, freezing, set/delete adapter and merge dispatch; this class adds what is BitFit's own:
target selection by bias term (`mapping.select_targets`), mixed batches (`adapter_names=[...]`), half-precision
checkpoints (`save_dtype`), weighted combinations of adapters, and a checkpoint check that leaves the model exactly as
it was when a file does not fit it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _delete_auxiliary_adapter,
)
from peft.utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .config import BitFitConfig
from .layer import BitFitLayer
from .mapping import select_targets
from .mixed import BASE, MixedBatch, check_names, mixed_batch, new_generation
from .registration import PREFIX

_PEFT_PREFIX = "base_model.model."
# Base model -> requires_grad of its parameters before the first BitFit injection, to undo a failed load exactly.
_REQUIRES_GRAD_BEFORE: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


class BitFitModel(BaseTuner):
    """BitFit tuner: bias deltas over a frozen base model, many adapters at once.

    Args:
        model (`nn.Module`): the model to adapt (modified in place).
        config (`BitFitConfig`): the adapter's configuration.
        adapter_name (`str`): the adapter's name (`"__base__"` is reserved).

    Example:

    >>> import bitfit_peft, transformers
    >>> from peft import get_peft_model
    >>> base = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=16, vocab_size=20))
    >>> model = get_peft_model(base, bitfit_peft.BitFitConfig(bias_terms=["query"]))
    >>> model.get_nb_trainable_parameters()
    (8, 7972)
    """

    prefix: str = PREFIX
    tuner_layer_cls = BitFitLayer
    target_module_mapping: dict[str, list[str]] = {}
    _routing: dict[str, Any] | None = None  # mixed-batch routing, rebuilt when the set of adapters changes
    _selection: dict[str, list[int] | None]

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        if adapter_name == BASE:
            raise ValueError(f'"{BASE}" is reserved for the base model in mixed batches; pick another adapter name.')
        if not any(isinstance(m, BitFitLayer) for m in model.modules()):
            # What the base model looked like, so a failed load can put it back exactly (see _abort_load).
            _REQUIRES_GRAD_BEFORE[model] = {n: p.requires_grad for n, p in model.named_parameters()}

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict[str, Any]) -> Any:
        return peft_config  # targets come from select_targets, not from a per-architecture name list

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        self._selection = select_targets(model, peft_config, self.get_model_config(model))

    def _check_target_module_exists(self, peft_config: Any, key: str) -> bool:  # type: ignore[override]
        return key in self._selection

    def _create_and_replace(  # type: ignore[override]
        self,
        peft_config: BitFitConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **_: Any,
    ) -> None:
        positions = self._selection.get(current_key)
        if isinstance(target, BitFitLayer):
            target.update_layer(adapter_name, init_weights=peft_config.init_weights, positions=positions)
            return
        new_module = BitFitLayer(target, adapter_name, init_weights=peft_config.init_weights, positions=positions)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Unlike BaseTuner's version, never copy weight/bias onto the new module: when unloading, the new module can
        # be a saved task head with no weight of its own (RoBERTa's classification head). No device move either:
        # BitFitLayer.update_layer already creates the deltas on the base layer's device.
        setattr(parent, child_name, new_module)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            self._routing = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._routing = None

    # ------------------------------------------------------------------ mixed batches
    def _routing_state(self) -> dict[str, Any]:
        """Slots of the resident adapters, and the layers and heads to route; rebuilt when adapters change."""
        state: dict[str, Any] | None = getattr(self, "_routing", None)
        if state is None:
            names = sorted(self.peft_config)
            state = {
                "slots": {name: i for i, name in enumerate(names, start=1)},
                "generation": new_generation(),
                "layers": [m for m in self.model.modules() if isinstance(m, BitFitLayer)],
                "heads": [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)],
                # DeBERTa's relative-position embeddings go through targeted layers once for the whole batch
                "shared_rows": getattr(getattr(self.model, "config", None), "model_type", None)
                in ("deberta", "deberta-v2")
                and bool(getattr(self.model.config, "relative_attention", False)),
            }
            self._routing = state
        return state

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "adapter_names (mixed-adapter batches) is for inference: call model.eval() first. To train several "
                "tasks, train each adapter with set_adapter."
            )
        state = self._routing_state()
        names = check_names(adapter_names, state["slots"])
        merged = sorted({n for layer in state["layers"] for n in layer.merged_adapters})
        if merged:
            raise ValueError(
                f"Cannot run a mixed-adapter batch while adapters {merged} are merged into the base model: "
                "call model.unmerge_adapter() first."
            )
        batch = next((t for t in (*(kwargs.get(k) for k in _BATCH_KEYS), *args) if isinstance(t, torch.Tensor)), None)
        if batch is not None and batch.shape[0] != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {batch.shape[0]} examples: "
                "pass exactly one adapter name per example."
            )
        if state["shared_rows"]:
            raise ValueError(
                "Mixed-adapter batches are not supported on DeBERTa with relative attention: its relative-position "
                "embeddings go through the attention projections once for the whole batch, so they cannot follow "
                "one adapter per example. Group the batch by task and use set_adapter for each group."
            )
        routing = MixedBatch(names, state["slots"], state["generation"], beams=kwargs.get("num_beams") or 1)
        handles = []
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Module):

            def record_tokens(module: nn.Module, hook_args: tuple) -> None:
                if hook_args and isinstance(hook_args[0], torch.Tensor) and hook_args[0].dim() == 2:
                    routing.tokens = hook_args[0].shape[1]

            handles.append(embeddings.register_forward_pre_hook(record_tokens))
        routed = [h for h in state["heads"] if isinstance(h, ModulesToSaveWrapper)]
        for head in routed:
            vars(head)["forward"] = partial(_routed_head_forward, head, routing)  # shadows the method until removed
        for head in state["heads"]:
            if head not in routed:  # other auxiliary wrappers route themselves from the adapter_names kwarg
                handles.append(head.register_forward_pre_hook(partial(_names_kwarg, routing), with_kwargs=True))
        try:
            with mixed_batch(routing):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for head in routed:
                del vars(head)["forward"]

    # ------------------------------------------------------------------ task arithmetic
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Create `adapter_name` whose deltas are `sum(w * delta)` over `adapters` (task arithmetic).

        Task heads (modules_to_save) are not combined: the new adapter's head starts from the base model's.

        Args:
            adapters (`list[str]`): existing adapters to combine.
            weights (`list[float]`): one weight per adapter.
            adapter_name (`str`): name of the new adapter.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(
                f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and "
                f"{len(weights)} weights."
            )
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; existing adapters: {sorted(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick a new name or delete it first.")
        layers = {k: m for k, m in self.model.named_modules() if isinstance(m, BitFitLayer)}
        configs: list[Any] = [self.peft_config[a] for a in adapters]
        first = configs[0]
        same_targets = all(
            (c.target_modules, c.bias_terms, c.layers_to_transform, c.exclude_modules, c.add_missing_bias)
            == (
                first.target_modules,
                first.bias_terms,
                first.layers_to_transform,
                first.exclude_modules,
                first.add_missing_bias,
            )
            for c in configs
        )
        if same_targets:
            new_config: Any = replace(first, init_weights=True, inference_mode=True)
        else:  # the union of the modules any of them targets, each over its whole bias
            keys = {k for k, m in layers.items() if any(a in m.bitfit_delta for a in adapters)}
            new_config = replace(
                first,
                target_modules=keys,
                bias_terms=None,
                layers_to_transform=None,
                layers_pattern=None,
                exclude_modules=None,
                add_missing_bias=True,
                init_weights=True,
                inference_mode=True,
            )
        self.peft_config[adapter_name] = new_config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        with torch.no_grad():
            for layer in layers.values():
                if adapter_name not in layer.bitfit_delta:
                    continue
                target = layer.bitfit_delta[adapter_name]
                total = torch.zeros(layer._shape, dtype=torch.float32, device=target.device)
                for name, weight in zip(adapters, weights, strict=True):
                    if name in layer.bitfit_delta:
                        total += weight * layer.full_delta(name).to(total.device, torch.float32)
                if adapter_name in layer.bitfit_index:
                    total = total.index_select(0, layer.bitfit_index[adapter_name])
                target.copy_(total)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        dtype = getattr(torch, config.save_dtype) if getattr(config, "save_dtype", None) else None
        if dtype is not None:
            out = {k: v.to(dtype) if f".{PREFIX}" in k else v for k, v in out.items()}
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problem = _check_against_model(model, adapter_name, remapped)
        if problem:
            _abort_load(model, adapter_name)
            raise ValueError(
                f"Adapter checkpoint does not fit this model ({problem}). The model was left as it was. Load the "
                "adapter onto the base model it was trained on, with the same BitFitConfig."
            )
        return remapped


def _names_kwarg(routing: MixedBatch, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = args[0] if args else None
    kwargs["adapter_names"] = routing.names_for(x.shape[0] if isinstance(x, torch.Tensor) else len(routing.names))
    return args, kwargs


def _routed_head_forward(wrapper: ModulesToSaveWrapper, routing: MixedBatch, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Run each example through its adapter's copy of a task head (the base head for `__base__` or an adapter
    without one), for heads of any structure: rows are grouped by adapter, one call per group, then put back."""
    if wrapper.disable_adapters:
        return wrapper.original_module(x, *args, **kwargs)
    n = x.shape[0]
    names = routing.names_for(n)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    out: torch.Tensor | None = None
    for name, rows in groups.items():
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module  # noqa: SIM401
        index = torch.tensor(rows, device=x.device)

        def take(t: Any, index: torch.Tensor = index) -> Any:
            return t.index_select(0, index) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t

        y = module(take(x), *(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"Mixed-adapter batches route task heads that return one tensor; {type(module).__name__} returned "
                f"{type(y).__name__}. Group the batch by task and use set_adapter instead."
            )
        if out is None:
            out = y.new_empty((n, *y.shape[1:]))
        out.index_copy_(0, index, y)
    return out


def _check_against_model(model: nn.Module, adapter_name: str, remapped: dict[str, torch.Tensor]) -> str | None:
    """Describe the first mismatch between a checkpoint and the adapter just injected, or None.

    Walks the modules rather than `model.state_dict()`, whose size grows with every resident adapter.
    """
    expected: dict[str, torch.Tensor] = {}
    for key, module in model.named_modules():
        if isinstance(module, BitFitLayer) and adapter_name in module.bitfit_delta:
            expected[f"{key}.{PREFIX}delta.{adapter_name}".removeprefix(_PEFT_PREFIX)] = module.bitfit_delta[
                adapter_name
            ]
    loaded = {k.removeprefix(_PEFT_PREFIX): v for k, v in remapped.items()}
    unexpected = sorted(k for k in loaded if f".{PREFIX}" in k and k not in expected)
    missing = sorted(k for k in expected if k not in loaded)
    if unexpected:
        return f"unexpected keys for modules this config does not target: {unexpected[:3]}"
    if missing:
        return f"missing deltas for modules {[k.rsplit('.' + PREFIX, 1)[0] for k in missing[:3]]}"
    for key, value in loaded.items():
        target: torch.Tensor | None = expected.get(key)
        if target is None:  # a task head or other saved module: look it up by name
            for candidate in (key, _PEFT_PREFIX + key):
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


def _abort_load(model: nn.Module, adapter_name: str) -> None:
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
        if isinstance(tuner, BitFitModel):
            tuner._routing = None
        return
    tuner = getattr(model, "base_model", None)
    inner: Any = tuner.model if isinstance(tuner, BitFitModel) else model
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
