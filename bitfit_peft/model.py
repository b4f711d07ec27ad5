"""`BitFitModel`: the peft tuner that injects `BitFitLayer` modules, routes mixed-task batches, checks checkpoints.

`BaseTuner` does injection, freezing, set/delete adapter and merge dispatch; this class adds what is BitFit's own:
target selection by bias term (`targets.select_targets`), mixed batches (`adapter_names=[...]`), compact checkpoints
(`save_dtype`, `keep_fraction`, the packed layout of `compact`), the base-model fingerprint, weighted combinations of
adapters, and a checkpoint check that leaves the model exactly as it was when a file does not fit it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import compact
from .config import BitFitConfig
from .constants import BASE, PREFIX, is_delta_key
from .fingerprint import fingerprint, target_modules_of
from .heads import check_head, head_kind
from .layer import BitFitLayer
from .loading import (
    abort_load,
    check_against_model,
    check_fingerprint,
    check_injected_fingerprint,
    decode_for_model,
    refuse_packed_outside_peft,
    remember_requires_grad,
)
from .router import Router, router_for
from .routing import MixedBatch, check_names, mixed_batch
from .targets import select_targets

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
    (8, 4968)
    """

    prefix: str = PREFIX
    tuner_layer_cls = BitFitLayer
    target_module_mapping: dict[str, list[str]] = {}
    _selection: dict[str, list[int] | None]

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # A single config (a PeftModel passes a dict) means peft's inject_adapter_in_model, which is how transformers'
        # load_adapter injects before it reads the weights file by key name, skipping our load hooks.
        injected_alone = isinstance(peft_config, PeftConfig)
        if injected_alone:
            refuse_packed_outside_peft(peft_config)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if injected_alone:
            check_injected_fingerprint(self.model, adapter_name, peft_config)

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        if adapter_name == BASE:
            raise ValueError(f'"{BASE}" is reserved for the base model in mixed batches; pick another adapter name.')
        remember_requires_grad(model)  # so a failed load can put the base model back exactly

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
        # before anything is injected (PeftModel and load_adapter both come here), so a refused adapter leaves the
        # model as it was
        config = self.peft_config[adapter_name]
        check_head(getattr(config, "head", None), model, bool(getattr(config, "modules_to_save", None)))
        with self.router.lock.write():  # waits for calls in flight; calls wait for the injection
            try:
                super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
            finally:
                self.router.routing = None
                # peft's inject_adapter ends by writing back the requires_grad flags of the parameters that existed
                # before (earlier adapters' deltas) directly, behind each layer's record of its trainable deltas:
                # re-read them, or set_adapter would leave an earlier adapter trainable (transformers' add_adapter).
                for module in model.modules():
                    if isinstance(module, BitFitLayer):
                        module._grad_on = {n for n, p in module._delta_params().items() if p.requires_grad}

    def delete_adapter(self, adapter_name: str) -> None:
        with self.router.lock.write():
            super().delete_adapter(adapter_name)
            self.router.routing = None

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        with self.router.lock.write():
            super().set_adapter(adapter_name, inference_mode=inference_mode)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        with self.router.lock.write():
            super().merge_adapter(*args, **kwargs)

    def unmerge_adapter(self) -> None:
        with self.router.lock.write():
            super().unmerge_adapter()

    # ------------------------------------------------------------------ mixed batches
    @property
    def router(self) -> Router:
        """The lock and mixed-batch routing snapshot of this model (see `bitfit_peft.router`)."""
        return router_for(self)

    def invalidate_routing(self) -> None:
        """Rebuild mixed-batch routing on the next call: after replacing delta or head tensors by hand (adapter
        loads, deletes, hotswaps and in-place edits are picked up without it). Waits for calls in flight."""
        self.router.invalidate()

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        router = self.router
        if adapter_names is None:
            with router.lock.read():  # adapter changes wait for this call, and this call for them
                yield
            return
        if self.training:
            raise ValueError(
                "adapter_names (mixed-adapter batches) is for inference: call model.eval() first. To train several "
                "tasks, train each adapter with set_adapter."
            )
        names = check_names(adapter_names, self.peft_config)  # no per-call copy: O(1) with 10,000 resident
        batch = next((t for t in (*(kwargs.get(k) for k in _BATCH_KEYS), *args) if isinstance(t, torch.Tensor)), None)
        if batch is not None and batch.shape[0] != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {batch.shape[0]} examples: "
                "pass exactly one adapter name per example."
            )
        unique = list(dict.fromkeys(n for n in names if n != BASE))
        with router.reading(self.model, list(self.peft_config), unique) as routing:
            check_names(names, routing.slots)
            merged = sorted({n for layer in routing.tables for n in layer.merged_adapters})
            if merged:
                raise ValueError(
                    f"Cannot run a mixed-adapter batch while adapters {merged} are merged into the base model: "
                    "call model.unmerge_adapter() first."
                )
            if routing.shared_rows:
                raise ValueError(
                    "Mixed-adapter batches are not supported on DeBERTa with relative attention: its relative-position "
                    "embeddings go through the attention projections once for the whole batch, so they cannot follow "
                    "one adapter per example. Group the batch by task and use set_adapter for each group."
                )
            with mixed_batch(MixedBatch(names, routing, beams=kwargs.get("num_beams") or 1)):
                yield

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
        # FSDP2 shards parameters as DTensors: gather the adapter's own (a collective, so every rank saves, with
        # `is_main_process` on one), never the base weights of the sharded model's state dict.
        out = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in out.items()}
        deltas = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in out.items() if is_delta_key(k)}
        others = {k: v for k, v in out.items() if not is_delta_key(k)}
        config.head = head_kind(model)  # recorded in adapter_config.json, which peft writes next
        with contextlib.suppress(ValueError):  # merged adapters hide the base weights: keep the recorded fingerprint
            config.base_fingerprint = fingerprint(model, target_modules_of(list(deltas)))
        save_dtype, keep = getattr(config, "save_dtype", None), getattr(config, "keep_fraction", None)
        keep = keep if keep is not None and keep < 1.0 else None
        first = next(iter(deltas.values()), None)
        own = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
        store = compact.codec(save_dtype or (own if own in compact.CODECS else "float32"))
        packed = getattr(config, "packed", None)
        if packed is None:  # a compact option asks for the compact layout; plain float32 stays readable by any tool
            packed = keep is not None or (save_dtype is not None and store.packed_by_default)
            config.packed = bool(deltas) and packed  # recorded in adapter_config.json, which peft writes next
        if deltas and packed:
            return {**others, **compact.encode(deltas, store.name, keep)}
        return {**others, **{k: v.to(store.dtype) for k, v in deltas.items()}}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        try:
            state_dict = decode_for_model(model, adapter_name, state_dict)
        except ValueError as err:
            abort_load(model, adapter_name)
            raise ValueError(f"{err} The model was left as it was.") from None
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problem = check_against_model(model, adapter_name, remapped)
        if problem:
            abort_load(model, adapter_name)
            raise ValueError(
                f"Adapter checkpoint does not fit this model ({problem}). The model was left as it was. Load the "
                "adapter onto the base model it was trained on, with the same BitFitConfig."
            )
        mismatch = check_fingerprint(model, config, [k for k in state_dict if is_delta_key(k)])
        if mismatch:
            abort_load(model, adapter_name)
            raise ValueError(f"{mismatch} The model was left as it was.")
        return remapped
