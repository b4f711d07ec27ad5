"""Sentence embeddings of a served encoder: how token states become one vector, as the checkpoint says.

A sentence-transformers checkpoint records its pooling in `1_Pooling/config.json` (mean, CLS, max or
mean-sqrt-len) and, with a `sentence_transformers.models.Normalize` entry in `modules.json`, that its embeddings
are L2-normalised; `Pooling.from_checkpoint` reads both, so a served task embeds as `SentenceTransformer.encode`
does. A checkpoint without these files pools by the masked mean, unnormalised (stated in docs/serving-http.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

__all__ = ["Pooling"]

MODES = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class Pooling:
    """How to pool token states, and whether to L2-normalise.

    Example:

    >>> pool = Pooling(mode="mean", normalize=True)
    >>> pool(torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]]), torch.tensor([[1, 1, 0]]))
    tensor([[0.6000, 0.8000]])
    """

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Invalid pooling mode {self.mode!r}: use one of {MODES}.")

    @classmethod
    def from_checkpoint(cls, path: str) -> Pooling:
        """The pooling of a local sentence-transformers checkpoint; mean, unnormalised, for anything else."""
        config, modules = os.path.join(path, "1_Pooling", "config.json"), os.path.join(path, "modules.json")
        mode, normalize = "mean", False
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                flags = json.load(f)
            chosen = [m for m in MODES if flags.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")]  # fmt: skip
            mode = chosen[0] if chosen else "mean"
        if os.path.isfile(modules):
            with open(modules, encoding="utf-8") as f:
                normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in json.load(f))
        return cls(mode, normalize)

    def __call__(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per row of `states` (batch, tokens, hidden) over the positions where `mask` is 1."""
        weights = mask.unsqueeze(-1).to(states.dtype)
        if self.mode == "cls":
            out = states[:, 0]
        elif self.mode == "max":
            out = states.masked_fill(weights == 0, torch.finfo(states.dtype).min).amax(dim=1)
        else:
            total, count = (states * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)
            out = total / (count.sqrt() if self.mode == "mean_sqrt_len" else count)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out
