"""Mean-pooling sequence-classification head for encoders trained with mean pooling (sentence-transformers).

Checkpoints such as `sentence-transformers/all-MiniLM-L6-v2` were trained to produce sentence embeddings as the
masked mean of the token states; their `[CLS]` state and pooler were never trained for that job. Through the
standard `*ForSequenceClassification` route (pooler on `[CLS]`), bias-only training has to rebuild that route from
the biases alone and often learns nothing, while full fine-tuning retrains the pooler. `MeanPooledSequenceClassifier`
puts a linear classifier on the masked mean instead. Its head is named `classifier`, so
`PeftModelForSequenceClassification` trains it whole (`modules_to_save`) exactly like the standard classifier,
and the encoder keeps the attribute name of its architecture (`bert`, `roberta`, ...) so module names, and therefore
BitFit's bias-term classification, are the same as in `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "MEAN_POOLING",
    "MeanPoolingHead",
    "MeanPooledSequenceClassifier",
    "check_head",
    "head_kind",
    "uses_mean_pooling",
]

ProblemType = Literal["regression", "single_label_classification", "multi_label_classification"]


class MeanPoolingHead(nn.Module):
    """Masked mean over the token states, then dropout and a linear layer.

    Args:
        hidden_size (`int`): Size of the encoder's hidden states.
        num_labels (`int`): Number of outputs (1 for regression).
        dropout (`float`, defaults to `0.1`): Dropout before the linear layer.

    Example:

        >>> import torch
        >>> head = MeanPoolingHead(hidden_size=8, num_labels=3)
        >>> head(torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])).shape
        torch.Size([2, 3])
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    @staticmethod
    def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of `hidden_states` (batch, seq, hidden) over the positions where `attention_mask` is 1."""
        if attention_mask is None:
            return hidden_states.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.dropout(self.pool(hidden_states, attention_mask)))


class MeanPooledSequenceClassifier(nn.Module):
    """An encoder with a `MeanPoolingHead`, called like a transformers `*ForSequenceClassification` model.

    The forward takes the usual `input_ids`, `attention_mask`, `token_type_ids`, `labels` and returns a
    `SequenceClassifierOutput`; the loss follows transformers' `problem_type` rules (MSE for one label,
    cross-entropy for single-label classification, BCE for multi-label). Use it with `get_peft_model` and
    `task_type="SEQ_CLS"`: the head, named `classifier`, is then trained whole and saved with the adapter.

    Args:
        encoder (`PreTrainedModel`): A bare encoder (`AutoModel`), e.g. a `BertModel`.
        num_labels (`int`): Number of labels (1 for regression).
        problem_type (`str | None`): `"regression"`, `"single_label_classification"` or
            `"multi_label_classification"`; `None` infers it from `num_labels` and the labels' dtype.
        dropout (`float | None`): Head dropout; `None` uses the encoder's `hidden_dropout_prob` (or 0.1).

    Example:

        >>> from transformers import BertConfig, BertModel
        >>> encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                                num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)
        >>> model = MeanPooledSequenceClassifier(encoder, num_labels=2)
        >>> model(input_ids=torch.tensor([[2, 5, 7, 3]]), labels=torch.tensor([1])).logits.shape
        torch.Size([1, 2])
        >>> sorted(name for name, _ in model.named_children())
        ['bert', 'classifier']
    """

    def __init__(
        self, encoder: PreTrainedModel, num_labels: int, problem_type: str | None = None, dropout: float | None = None
    ) -> None:
        super().__init__()
        allowed = (None, "regression", "single_label_classification", "multi_label_classification")
        if problem_type not in allowed:
            raise ValueError(f"Invalid problem_type '{problem_type}'. Must be one of {allowed}.")
        self.encoder_attribute = encoder.base_model_prefix or "encoder"
        setattr(self, self.encoder_attribute, encoder)
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.config.problem_type = cast("ProblemType | None", problem_type)
        configured: Any = getattr(self.config, "classifier_dropout", None)
        if configured is None:
            configured = getattr(self.config, "hidden_dropout_prob", 0.1)
        head_dropout = float(configured) if dropout is None else dropout
        self.classifier = MeanPoolingHead(self.config.hidden_size, num_labels, head_dropout)
        self.num_labels = num_labels

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, num_labels: int, problem_type: str | None = None, **kwargs: Any
    ) -> MeanPooledSequenceClassifier:
        """Load the encoder with `AutoModel.from_pretrained(name_or_path, **kwargs)` and add a fresh head.

        The pooler is not loaded (`add_pooling_layer=False` where the architecture accepts it): it is unused.
        """
        try:
            encoder = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
        except TypeError:  # architectures without a pooler do not accept the argument
            encoder = AutoModel.from_pretrained(name_or_path, **kwargs)
        model = cls(encoder, num_labels=num_labels, problem_type=problem_type)
        object.__setattr__(model, "name_or_path", str(name_or_path))  # what peft records as the base model
        return model

    @property
    def encoder_model(self) -> PreTrainedModel:
        """The wrapped encoder."""
        return getattr(self, self.encoder_attribute)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        encoder_kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        outputs = self.encoder_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **encoder_kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state, attention_mask)
        loss = self._loss(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
        if problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def uses_mean_pooling(name_or_path: str | os.PathLike) -> bool:
    """Whether a local checkpoint was trained with mean pooling (a sentence-transformers `1_Pooling/config.json`
    with `pooling_mode_mean_tokens`). Returns `False` for Hub ids and for checkpoints without that file."""

    path = os.path.join(str(name_or_path), "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("pooling_mode_mean_tokens", False))


MEAN_POOLING = "mean_pooling"  # `BitFitConfig.head` of adapters trained on a `MeanPooledSequenceClassifier`


def head_kind(model: nn.Module) -> str:
    """What `BitFitConfig.head` records for a model (a peft model is unwrapped): `"mean_pooling"` for a
    `MeanPooledSequenceClassifier`, else the model's class name (e.g. `"BertForSequenceClassification"`).

    Example:

        >>> head_kind(torch.nn.Linear(2, 2))
        'Linear'
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return MEAN_POOLING if isinstance(base, MeanPooledSequenceClassifier) else type(base).__name__


def check_head(recorded: str | None, model: nn.Module, has_head: bool) -> None:
    """Refuse to load an adapter trained with the head `recorded` onto `model` when the model has another head: a
    mean-pooling head on one side, or another class while the adapter carries a task head (`has_head`). Adapters
    saved before the field existed (`recorded` None) are not checked.

    Raises:
        ValueError: naming both heads and the class to load the adapter onto.
    """
    if recorded is None:
        return
    current = head_kind(model)
    if recorded == current or not (has_head or MEAN_POOLING in (recorded, current)):
        return
    if recorded == MEAN_POOLING:
        fix = (
            "load it onto bitfit_peft.MeanPooledSequenceClassifier.from_pretrained(base, num_labels=N) (the task "
            "head is a masked mean over the tokens, then `classifier.out_proj`)"
        )
    else:
        fix = f"load it onto {recorded} (e.g. AutoModelFor... of the same task, which builds {recorded})"
    raise ValueError(
        f"This adapter was trained with the head {recorded!r} but the model it is being loaded onto has the head "
        f"{current!r}: {fix}. The model was left as it was."
    )
