"""Lean training of a causal LM: the same loss and gradients, less memory kept for the backward.

Most of what a BitFit step on a decoder keeps for its backward is not BitFit's: it is the logits and their
log-softmax for the loss (batch x tokens x vocabulary, twice) and the gated MLP's three branch tensors per layer
(docs/training.md, "Training memory"). `enable_lean_training` patches a loaded causal LM, in place, so that:

- the loss never keeps the logits: the LM head and the cross-entropy run chunk by chunk inside one autograd
  Function, which computes the gradient of each chunk's summed loss (with respect to the hidden states and any
  trainable parameter of the head) as it goes and keeps only those gradients, hidden-sized, for the backward;
- the gated MLP keeps `gate` and `up` only, and recomputes `silu(gate)` in its backward (the same ops autograd runs,
  so the MLP's gradients are bitwise those of the unpatched model).

Only the training forward changes: a call with `labels`, with gradients enabled, returns the loss with `logits=None`;
every other call (evaluation, generation, no labels) runs the model's own forward. The technique does not depend on
BitFit: it shrinks any method's activations (LoRA's too), as long as the loss is the model's own causal-LM loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Causal LMs whose forward is exactly `hidden = self.model(...)`, `logits = self.lm_head(hidden)`, then transformers'
# causal-LM cross-entropy (no logit soft-capping or scaling), and MLPs whose forward is
# `down_proj(act_fn(gate_proj(x)) * up_proj(x))`. Others are refused by name rather than patched on a guess.
CAUSAL_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
DEFAULT_CHUNK = 256  # tokens per chunk: the loss peaks at ~3 chunk x vocabulary float32 tensors (256 x 49k: 48 MiB)
_PATCHED = "_bitfit_lean"


class _SiluMul(torch.autograd.Function):
    """`silu(gate) * up` keeping only `gate` and `up` for the backward (autograd would keep `silu(gate)` too)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        # The ops autograd's mul and silu backward run, in the same order: the gradients are bitwise the same.
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def _lean_mlp_forward(mlp: Any) -> Any:  # Any: its submodules are read by name, at call time (peft may wrap them)
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(_SiluMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


class _ChunkedLMLoss(torch.autograd.Function):
    """Causal-LM cross-entropy of `head(hidden)` computed chunk by chunk; keeps only the gradients for the backward.

    Inputs: the head module (not a tensor), hidden (N x H), shifted labels (N), the divisor of the summed loss
    (a 0-d tensor), the chunk size, then the head's trainable parameters (so that autograd routes their gradients).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        head: nn.Module,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        divisor: torch.Tensor,
        chunk: int,
        ignore_index: int,
        *params: nn.Parameter,
    ) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[1] else None
        d_params = [torch.zeros_like(p) for p in params]
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].detach().requires_grad_(d_hidden is not None)
            with torch.enable_grad():
                logits = head(h).float()  # transformers' loss upcasts the logits the same way
                loss = F.cross_entropy(
                    logits, labels[start : start + chunk], ignore_index=ignore_index, reduction="sum"
                )
            wants = ([h] if d_hidden is not None else []) + list(params)
            if wants and loss.requires_grad:
                grads = torch.autograd.grad(loss, wants, allow_unused=True)
                if d_hidden is not None:
                    d_hidden[start : start + chunk] = grads[0]
                    grads = grads[1:]
                for acc, g in zip(d_params, grads, strict=True):
                    if g is not None:
                        acc += g
            total += loss.detach()
        ctx.save_for_backward(divisor, *(t for t in (d_hidden, *d_params) if t is not None))
        ctx.has_hidden = d_hidden is not None
        return total / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        divisor, *saved = ctx.saved_tensors
        scale = grad / divisor
        d_hidden = saved.pop(0) if ctx.has_hidden else None
        if d_hidden is not None:
            d_hidden = d_hidden * scale.to(d_hidden.dtype)
        return (None, d_hidden, None, None, None, None, *(g * scale.to(g.dtype) for g in saved))


def chunked_causal_lm_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """transformers' causal-LM loss of `head(hidden)` against `labels`, without keeping the logits for the backward.

    Args:
        head: the LM head (any module mapping hidden states to logits; its trainable parameters get gradients).
        hidden: the decoder's last hidden states, batch x tokens x hidden.
        labels: batch x tokens token ids, `ignore_index` where no loss is taken; shifted here as transformers does.
        num_items_in_batch: divide the summed loss by this instead of the number of labelled tokens (transformers'
            gradient-accumulation convention).
        ignore_index: the label value that takes no loss.
        chunk_size: tokens per chunk; the peak of the loss is one chunk's logits and their gradient.

    Example:

    >>> head = nn.Linear(8, 11, bias=False)
    >>> hidden, labels = torch.randn(2, 5, 8, requires_grad=True), torch.randint(0, 11, (2, 5))
    >>> shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    >>> reference = F.cross_entropy(head(hidden).flatten(0, 1), shifted.flatten())
    >>> bool(torch.allclose(chunked_causal_lm_loss(head, hidden, labels, chunk_size=3), reference))
    True
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk); got {chunk_size!r}.")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be batch x tokens x hidden and labels batch x tokens; got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}."
        )
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (shifted != ignore_index).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    params = [p for p in head.parameters() if p.requires_grad]
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss: torch.Tensor = _ChunkedLMLoss.apply(head, flat, shifted, divisor, chunk_size, ignore_index, *params)
    return loss


def _outer_model_name(model: nn.Module) -> str:
    """The class name of the outermost transformers model in `model` (for error messages)."""
    from transformers import PreTrainedModel

    return next((type(m).__name__ for m in model.modules() if isinstance(m, PreTrainedModel)), type(model).__name__)


def _lean_lm_forward(lm: Any, original: Any, chunk_size: int) -> Any:  # Any: as for the MLP
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(*args: Any, **kwargs: Any) -> Any:
        if args:  # transformers' forward takes input_ids first; anything more positional goes the original way
            if len(args) > 1 or "input_ids" in kwargs:
                return original(*args, **kwargs)
            kwargs["input_ids"] = args[0]
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled() or kwargs.get("logits_to_keep") not in (None, 0):
            return original(**kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        loss_kw = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        if "shift_labels" in kwargs:
            raise ValueError(
                "enable_lean_training shifts the labels itself; got shift_labels=. Pass labels only, or call "
                "disable_lean_training(model) to use shift_labels."
            )
        as_tuple = kwargs.pop("return_dict", None) is False
        outputs = lm.model(**{k: v for k, v in kwargs.items() if k != "ignore_index"}, return_dict=True)
        loss = chunked_causal_lm_loss(lm.lm_head, outputs.last_hidden_state, labels, chunk_size=chunk_size, **loss_kw)
        # The decoder's other outputs (its cache, hidden states, attentions) under the names both outputs share.
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        out = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
        return out.to_tuple() if as_tuple else out

    return forward


def enable_lean_training(
    model: nn.Module, *, loss: bool = True, mlp: bool = True, chunk_size: int = DEFAULT_CHUNK
) -> list[str]:
    """Patch a causal LM (bare, or inside a peft model) in place to keep less for the backward; exact gradients.

    Args:
        model: a transformers causal LM of a supported class (`CAUSAL_LMS`), or a peft model around one.
        loss: compute the training loss chunk by chunk without keeping the logits (training calls with `labels`
            then return `logits=None`).
        mlp: keep `gate` and `up` only in every gated SiLU MLP (`GATED_MLPS`), recomputing `silu(gate)` in backward.
        chunk_size: tokens per chunk of the loss.

    Returns:
        The names of the patched modules (relative to `model`). `disable_lean_training(model)` undoes the patches.

    Example:

    >>> import transformers
    >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
    ...                                   num_attention_heads=2)
    >>> enable_lean_training(transformers.LlamaForCausalLM(config))
    ['', 'model.layers.0.mlp']
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk); got {chunk_size!r}.")
    if not (loss or mlp):
        raise ValueError("enable_lean_training with loss=False and mlp=False patches nothing; enable one of them.")
    names = {id(m): n for n, m in model.named_modules()}
    lms = [m for m in model.modules() if type(m).__name__ in CAUSAL_LMS]
    if loss and len(lms) != 1:
        raise TypeError(
            f"enable_lean_training(loss=True) patches one causal LM of {list(CAUSAL_LMS)}; found "
            f"{_outer_model_name(model)}. "
            "Pass loss=False to patch the MLPs only."
        )
    mlps = [m for m in model.modules() if type(m).__name__ in GATED_MLPS] if mlp else []
    if mlp and not mlps:
        raise TypeError(
            f"enable_lean_training(mlp=True) found no gated MLP of {list(GATED_MLPS)} in {_outer_model_name(model)}. "
            "Pass mlp=False to patch the loss only."
        )
    for m in mlps:
        if not isinstance(m.act_fn, nn.SiLU) and type(m.act_fn).__name__ != "SiLUActivation":
            raise TypeError(
                f"enable_lean_training(mlp=True) recomputes SiLU only; {names[id(m)]} uses "
                f"{type(m.act_fn).__name__}. Pass mlp=False."
            )
    # Everything checked: patch (a module patched before keeps its patch).
    patched: list[str] = []
    for m in lms[:1] if loss else []:
        if not vars(m).get(_PATCHED, False):
            m.forward = _lean_lm_forward(m, m.forward, chunk_size)
            setattr(m, _PATCHED, True)
        patched.append(names[id(m)])
    for m in mlps:
        if not vars(m).get(_PATCHED, False):
            m.forward = _lean_mlp_forward(m)
            setattr(m, _PATCHED, True)
        patched.append(names[id(m)])
    return patched


def disable_lean_training(model: nn.Module) -> None:
    """Undo `enable_lean_training`: every patched module runs its class's own forward again."""
    for m in model.modules():
        if vars(m).get(_PATCHED, False):
            del m.forward
            delattr(m, _PATCHED)
