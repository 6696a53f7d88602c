"""Pooled side vectors -> 3 logits (A wins, B wins, tie)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

COMBINATIONS = ("a", "b", "diff", "prod", "absdiff")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mean":
        return mean_pool(hidden, mask)
    if method == "cls":
        return hidden[:, 0]
    if method == "mean_cls":
        return torch.cat([mean_pool(hidden, mask), hidden[:, 0]], dim=-1)
    raise ValueError(f"model.pooling={method!r}; choose mean, cls or mean_cls")


def pooled_size(hidden_size: int, method: str) -> int:
    return 2 * hidden_size if method == "mean_cls" else hidden_size


class PairHead(nn.Module):
    """Combine the two side vectors ([a, b, a-b, a*b] by default) and map them through an MLP.

    Freshly initialised, so it gets its own (higher) learning rate in the optimiser.
    """

    def __init__(self, in_size: int, combine: Sequence[str] = ("a", "b", "diff", "prod"), hidden: int = 256,
                 dropout: float = 0.0, n_classes: int = 3) -> None:
        super().__init__()
        unknown = [c for c in combine if c not in COMBINATIONS]
        if unknown or not combine:
            raise ValueError(f"model.combine={list(combine)}; choose from {', '.join(COMBINATIONS)}")
        self.combine = tuple(combine)
        self.norm = nn.LayerNorm(in_size)  # keeps the head's input scale fixed whatever the backbone
        layers: list[nn.Module] = [nn.Linear(in_size * len(self.combine), hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, n_classes))
        self.mlp = nn.Sequential(*layers)

    def features(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        parts = {"a": lambda: a, "b": lambda: b, "diff": lambda: a - b, "prod": lambda: a * b,
                 "absdiff": lambda: (a - b).abs()}
        return torch.cat([parts[c]() for c in self.combine], dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(self.norm(a), self.norm(b)))
