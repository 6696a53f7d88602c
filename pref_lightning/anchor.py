"""The anchored head's offset: a multinomial logistic regression on the side statistics.

Fine-tuned encoders on this task often end *behind* a logistic regression on the length/format
statistics the head already receives (1.088 vs 1.075 on real arena rows). The anchored head starts the
network at that regression: its logits are an offset added to the head's output, and the head's last layer
starts at exactly zero, so step 0 scores the regression's validation loss and training can only add what
the text gives (the same idea as residual-on-a-baseline boosting, and as LoRA's zero-initialised B).

The regression is fitted on the training split's bounded statistics (`stats_norm.py`) in both orders, (A, B)
and (B, A) with the labels exchanged, so that it is (nearly) position-symmetric like the swap-augmented
network. Its weights travel in the model's constructor arguments (`anchor`), hence in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pref_lightning.metrics import SWAP, class_probabilities, competition_log_loss
from pref_lightning.text_stats import fit_logistic_regression


def anchor_features(stats_a, stats_b):
    """[stats_a, stats_b, stats_a - stats_b] for numpy arrays or tensors (..., n_stats) -> (..., 3 n_stats)."""
    if isinstance(stats_a, torch.Tensor):
        return torch.cat([stats_a, stats_b, stats_a - stats_b], -1)
    return np.concatenate([stats_a, stats_b, stats_a - stats_b], -1)


def fit_anchor(stats_a: np.ndarray, stats_b: np.ndarray, labels: np.ndarray, n_classes: int = 3,
               l2: float = 1e-3, ties: np.ndarray | None = None, weight: np.ndarray | None = None) -> dict[str, Any]:
    """Fit the offset on normalised statistics (n, n_stats) of both sides and labels (n,), with the training
    loss of the network (losses.py) when rows carry `ties` (n,) bool or loss `weight` (n,).

    Returns {"weight": (3 n_stats, K) nested list, "bias": (K,) list} acting on `anchor_features`.
    """
    swap = np.asarray(SWAP[:n_classes])
    X = np.concatenate([anchor_features(stats_a, stats_b), anchor_features(stats_b, stats_a)]).astype(np.float64)
    y = np.concatenate([labels, swap[labels]])
    ties, weight = (None if v is None else np.concatenate([v, v]) for v in (ties, weight))  # both orders
    model = fit_logistic_regression(X, y, n_classes=n_classes, l2=l2, ties=ties, weight=weight)
    # fold the regression's own standardisation into one linear map on the features
    weight = model.weights / model.std[:, None]
    bias = model.bias - (model.mean / model.std) @ model.weights
    return {"weight": weight.tolist(), "bias": bias.tolist()}


class AnchorOffset(nn.Module):
    """Linear logits of the statistics, initialised from `fit_anchor`'s weights; frozen unless `trainable`."""

    def __init__(self, anchor: dict[str, Any], trainable: bool = False) -> None:
        super().__init__()
        weight = torch.tensor(anchor["weight"], dtype=torch.float32)
        self.linear = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)
            self.linear.bias.copy_(torch.tensor(anchor["bias"], dtype=torch.float32))
        self.linear.requires_grad_(trainable)

    def forward(self, stats_a: torch.Tensor, stats_b: torch.Tensor) -> torch.Tensor:
        return self.linear(anchor_features(stats_a, stats_b).float())


def anchor_logits(anchor: dict[str, Any], stats_a: np.ndarray, stats_b: np.ndarray, tta_swap: bool = True) -> np.ndarray:
    """(n, K) logits of the offset alone (the anchored model at step 0), averaged over both orders as swap
    TTA does when `tta_swap`."""
    weight, bias = np.asarray(anchor["weight"]), np.asarray(anchor["bias"])
    logits = anchor_features(stats_a, stats_b) @ weight + bias
    if tta_swap:
        swap = list(SWAP[: weight.shape[1]])
        logits = 0.5 * (logits + (anchor_features(stats_b, stats_a) @ weight + bias)[:, swap])
    return logits


def anchor_log_loss(anchor: dict[str, Any], stats_a: np.ndarray, stats_b: np.ndarray, labels: np.ndarray,
                    tta_swap: bool = True, floor: float = 0.0) -> float:
    """Log loss (nats) on `labels` of the offset alone with the model's probability floor: the anchored
    model's step-0 validation loss, the baseline its training must beat."""
    probs = class_probabilities(torch.from_numpy(anchor_logits(anchor, stats_a, stats_b, tta_swap)), floor=floor)
    return float(competition_log_loss(probs, torch.from_numpy(labels)))
