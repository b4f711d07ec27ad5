"""`BitFitConfig`: the configuration of a BitFit adapter (which biases get a delta, and how the deltas are stored).

Saving it (peft does, right after writing the weights) also writes the adapter's model card (`card.write_card`) and
the module order into a packed file's header; loading it checks the weights file before any model is touched.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft.config import PeftConfig

from .card import write_card
from .compact import CODECS, codec
from .constants import BIAS_TERMS, CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, BitFitPeftType
from .files import check_adapter_file, read_adapter_config, write_layout_metadata


@dataclass
class BitFitConfig(PeftConfig):
    """Configuration of a BitFit adapter: one trainable delta per targeted bias, over a frozen base model.

    BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022) fine-tunes only the bias terms of a pretrained model. Each
    adapter holds a zero-initialised delta per targeted bias, so a fresh adapter leaves every output bitwise unchanged.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Module names (exact or suffix match) or a regex (full match) of the modules whose bias gets a delta. Leave
            unset to target by `bias_terms`, or every bias in the model when `bias_terms` is unset too.
        bias_terms (`list[str]`, *optional*):
            The paper's named subsets, with the same meaning on every supported architecture: `query`, `key`,
            `value`, `attention_output`, `intermediate` (first FFN layer; gate and up for gated MLPs), `output`
            (second FFN layer) and `layernorm`. `["query", "intermediate"]` is the paper's b_q + b_m2.
        exclude_modules (`list[str]` or `str`, *optional*):
            Modules to leave alone, matched like `target_modules`.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only these layer indices get deltas.
        layers_pattern (`list[str]` or `str`, *optional*):
            The name of the layer list (`layers`, `h`, `layer`, ...) when `layers_to_transform` needs it.
        modules_to_save (`list[str]`, *optional*):
            Modules trained whole and saved with the adapter (task heads; peft adds `classifier`/`score` itself for
            sequence classification).
        add_missing_bias (`bool`):
            Give Linear/Conv1D/Conv/LayerNorm layers without a bias (Llama, Mistral, T5) a zero-initialised delta;
            merging creates the bias on the base layer. Norms without a bias argument (RMSNorm) are never targeted.
        init_weights (`bool`):
            `True` (default) initialises deltas to zero; `False` draws them from N(0, 0.05^2) (for tests).
        labels (`list[str]`, *optional*):
            The task's label names in the order of the head's outputs (serving and the model card show them).
        problem_type (`str`, *optional*):
            `"regression"`, `"single_label_classification"` or `"multi_label_classification"`.
        save_dtype (`str`, *optional*):
            Store the deltas as `"bfloat16"` or `"float16"` (half the file) or `"int8"` (a quarter: symmetric absmax,
            one float32 scale per bias vector, stored in the same file) in the checkpoint; they load back into the
            training dtype through every peft entry point. `None` or `"float32"` keeps the deltas' own dtype. The task
            head is never down-cast.
        keep_fraction (`float`, *optional*):
            Store only this fraction (0 < f <= 1) of each delta, the entries largest in magnitude, as values plus
            positions; the others load as 0. E.g. `0.1` keeps the largest 10%. Combines with `save_dtype`.
        packed (`bool`, *optional*):
            Store the deltas as one flat tensor with their layout (`True`: the file is at most ~5% more than its
            numbers in every dtype) or one tensor per bias (`False`: ~130 header bytes per bias). Unset: packed when
            `save_dtype` is `"bfloat16"`, `"float16"` or `"int8"` or `keep_fraction` is set, one tensor per bias for
            float32. `save_pretrained` records what it wrote. Packed files load through peft (`PeftModel`, `load_adapter`, `hotswap_adapter`, `AutoPeftModel*`);
            transformers' `model.load_adapter` reads tensors by name and refuses them with an error saying so.
        head (`str`, *optional*):
            Filled in by `save_pretrained`: `"mean_pooling"` for a `MeanPooledSequenceClassifier`, else the model's
            class (`"BertForSequenceClassification"`). Loading the adapter onto a model with another head raises,
            naming the class to load it onto. Adapters without it load as before.
        base_fingerprint (`str`, *optional*):
            Filled in by `save_pretrained`: a hash of the base model's targeted biases and a few weight rows
            (`bitfit_peft.fingerprint`). Loading onto a base with another fingerprint warns, or raises inside
            `bitfit_peft.files.load_policy(on_fingerprint_mismatch="error")`. Adapters without one load silently.

    Example:

    >>> from bitfit_peft import BitFitConfig
    >>> sorted(BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"]).bias_terms)
    ['intermediate', 'query']
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the modules whose bias gets a delta. Unset: use bias_terms, "
            "or every bias in the model."
        },
    )
    bias_terms: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Named bias subsets to train, any of {list(BIAS_TERMS)}; e.g. ['query', 'intermediate'] is the "
            "paper's b_q + b_m2. Unset: every bias."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the modules to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only the layers with these indices get deltas."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') used by layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained whole and saved with the adapter, e.g. a task head."}
    )
    add_missing_bias: bool = field(
        default=False,
        metadata={"help": "Give layers without a bias (Llama, T5 Linear) a zero-initialised delta."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the deltas (True) or draw them at random (False)."}
    )
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the task's labels, in the order of the head's outputs (read by the serving store and "
            "the model card); unset for regression or when unknown."
        },
    )
    problem_type: Literal["regression", "single_label_classification", "multi_label_classification"] | None = field(
        default=None,
        metadata={"help": "What the head predicts; unset: inferred from the head (1 output = regression)."},
    )
    save_dtype: str | None = field(
        default=None,
        metadata={
            "help": f"Dtype of the deltas in the checkpoint, one of {list(CODECS)} (`compact.CODECS`; int8: absmax, "
            "scales in the file); unset keeps theirs. They load back into the training dtype."
        },
    )
    keep_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Store only this fraction (0 < f <= 1) of each delta, the largest in magnitude, as values and "
            "positions; e.g. 0.1. Unset: store every value."
        },
    )
    packed: bool | None = field(
        default=None,
        metadata={
            "help": "One flat tensor of deltas (True) or one per bias (False); unset: packed for bfloat16/float16/int8 "
            "or keep_fraction, one per bias for float32. save_pretrained records the choice."
        },
    )
    head: str | None = field(
        default=None,
        metadata={
            "help": "The model the adapter was trained on: 'mean_pooling' (MeanPooledSequenceClassifier) or the "
            "transformers class; filled in by save_pretrained. Loading onto a model with another head is refused."
        },
    )
    base_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the base model the adapter was saved from (filled in by save_pretrained); "
            "loading onto another base warns or raises."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BitFitPeftType.BITFIT  # type: ignore[assignment]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)  # type: ignore[assignment]
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)  # type: ignore[assignment]
        if self.bias_terms is not None:
            if isinstance(self.bias_terms, str):
                self.bias_terms = [self.bias_terms]
            unknown = sorted(set(self.bias_terms) - set(BIAS_TERMS))
            if unknown:
                raise ValueError(
                    f"Unknown bias_terms {unknown}. Must be any of {list(BIAS_TERMS)}; "
                    "use target_modules to pick other modules by name."
                )
            if not self.bias_terms:
                raise ValueError(f"bias_terms is empty. Pass at least one of {list(BIAS_TERMS)}, or leave it unset.")
            self.bias_terms = set(self.bias_terms)  # type: ignore[assignment]
        if self.bias_terms is not None and self.target_modules is not None:
            raise ValueError(
                "Set either bias_terms or target_modules, not both: bias_terms picks modules by role on known "
                "architectures, target_modules by name. Use layers_to_transform / exclude_modules to narrow bias_terms."
            )
        store = None if self.save_dtype is None else codec(self.save_dtype)
        if self.keep_fraction is not None and (
            isinstance(self.keep_fraction, bool)
            or not isinstance(self.keep_fraction, (int, float))
            or not 0.0 < self.keep_fraction <= 1.0
        ):
            raise ValueError(
                f"Invalid keep_fraction {self.keep_fraction!r}. Must be a number in (0, 1] (e.g. 0.1 keeps the largest "
                "10% of each delta) or None to keep every value."
            )
        if self.packed is False and ((store is not None and store.scaled) or self.keep_fraction is not None):
            raise ValueError(
                f"packed=False cannot store save_dtype={self.save_dtype!r} / keep_fraction={self.keep_fraction!r}: "
                "scales (int8) and sparse positions live in the packed layout. Leave packed unset (or True)."
            )
        if self.head is not None and not isinstance(self.head, str):
            raise ValueError(f"head must be a string (e.g. 'mean_pooling') or None, got {self.head!r}.")
        if self.base_fingerprint is not None and not isinstance(self.base_fingerprint, str):
            raise ValueError(f"base_fingerprint must be a string or None, got {self.base_fingerprint!r}.")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(
                f"Invalid problem_type {self.problem_type!r}. Must be 'regression', 'single_label_classification', "
                "'multi_label_classification' or None."
            )
        if self.labels is not None and (
            isinstance(self.labels, str) or not all(isinstance(x, str) for x in self.labels)
        ):
            raise ValueError(f"labels must be a list of label names (str), got {self.labels!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too.")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> BitFitConfig:
        """Load the config, and check a local adapter file is readable before any model is touched."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(path):
            check_adapter_file(path)
        return config  # type: ignore[return-value]

    def to_json_dict(self) -> dict[str, Any]:
        """The config as `save_pretrained` writes it to adapter_config.json (sets as sorted lists, enums as strings)."""
        plain = {k: sorted(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        return json.loads(json.dumps(plain))  # type: ignore[no-any-return]

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json; beside a weights file (peft writes it first) also the module order into a packed
        file's header and the README.md model card (`bitfit_peft.card.write_card`). The weights file gets the config's
        permission bits (the user's umask): safetensors writes 0600, which another user serving the adapter cannot read."""
        super().save_pretrained(save_directory, **kwargs)
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        if os.path.isfile(weights):
            write_layout_metadata(weights)
            os.chmod(weights, stat.S_IMODE(os.stat(os.path.join(save_directory, CONFIG_NAME)).st_mode))
        if any(os.path.isfile(os.path.join(save_directory, n)) for n in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)):
            write_card(save_directory)


def read_config(directory: str) -> BitFitConfig:
    """The `BitFitConfig` saved in an adapter directory, checked as `BitFitConfig(...)` checks its arguments.

    Keys this version does not know (written by a newer peft) are ignored, as peft ignores them. This is how the
    package reads a saved config (the CLI, the serving store, `hotswap_adapter`); nothing else parses the file.

    Raises:
        ValueError: the directory or its `adapter_config.json` is missing or unreadable, not a BitFit config, or holds
            a value `BitFitConfig` refuses (the message names the file and the field).
    """
    saved = read_adapter_config(directory)
    known = {f.name for f in fields(BitFitConfig) if f.init}
    try:
        return BitFitConfig(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {err}") from None
