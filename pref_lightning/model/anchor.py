"""The anchored head's offset: a multinomial logistic regression on the side statistics.

Fine-tuned encoders on this task often end *behind* a logistic regression on the length/format
statistics the head already receives (1.088 vs 1.075 on real arena rows). The anchored head starts the
network at that regression: its logits are an offset added to the head's output, and the head's last layer
starts at exactly zero, so step 0 scores the regression's validation loss and training can only add what
the text gives (the same idea as residual-on-a-baseline boosting, and as LoRA's zero-initialised B).

The regression is fitted on the training split's bounded statistics (`stats_norm.py`) in both orders, (A, B)
and (B, A) with the labels exchanged, so that it is (nearly) position-symmetric like the swap-augmented
network, on [a, b, a - b, |a - b|] (the last part lets the linear tie logit see "the answers are alike").
Its L2 penalty is chosen by k-fold cross-validation on the same rows (grouped by prompt), as scikit-learn's
`LogisticRegressionCV` does: on the 999 arena rows a fixed 1e-3 overfits (5-fold OOF 1.079 against 1.044
at the chosen strength). Its weights travel in the model's constructor arguments (`anchor`), hence in every
checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pref_lightning.core.metrics import SWAP, class_probabilities, competition_log_loss
from pref_lightning.data.text_stats import fit_logistic_regression

log = logging.getLogger(__name__)
FEATURES = "a,b,diff,absdiff"  # what `anchor_features` builds; anchors without "features" used a,b,diff
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # candidate penalties (on standardised features) for the inner CV
CV_FOLDS = 5


def anchor_features(stats_a, stats_b, features: str = FEATURES):
    """[a, b, a - b, |a - b|] (or [a, b, a - b] for `features="a,b,diff"`, anchors fitted before) of numpy
    arrays or tensors (..., n_stats) -> (..., 4 n_stats) (or 3 n_stats)."""
    torch_in = isinstance(stats_a, torch.Tensor)
    cat, absolute = (torch.cat, torch.abs) if torch_in else (np.concatenate, np.abs)
    parts = [stats_a, stats_b, stats_a - stats_b]
    if features == FEATURES:
        parts.append(absolute(stats_a - stats_b))
    elif features != "a,b,diff":
        raise ValueError(f"unknown anchor features {features!r}")
    return cat(parts, -1)


def _both_orders(stats_a, stats_b, labels, n_classes, ties=None, weight=None, features=FEATURES):
    """Rows in both orders, (A, B) and (B, A) with the labels exchanged."""
    swap = np.asarray(SWAP[:n_classes])
    X = np.concatenate([anchor_features(stats_a, stats_b, features),
                        anchor_features(stats_b, stats_a, features)]).astype(np.float64)
    y = np.concatenate([labels, swap[labels]])
    ties, weight = (None if v is None else np.concatenate([v, v]) for v in (ties, weight))
    return X, y, ties, weight


def _fit(stats_a, stats_b, labels, n_classes, l2, ties=None, weight=None, features=FEATURES) -> dict[str, Any]:
    X, y, ties, weight = _both_orders(stats_a, stats_b, labels, n_classes, ties, weight, features)
    model = fit_logistic_regression(X, y, n_classes=n_classes, l2=l2, ties=ties, weight=weight)
    # fold the regression's own standardisation into one linear map on the features
    return {"weight": (model.weights / model.std[:, None]).tolist(),
            "bias": (model.bias - (model.mean / model.std) @ model.weights).tolist(), "features": features}


def choose_l2(stats_a: np.ndarray, stats_b: np.ndarray, labels: np.ndarray, groups: Sequence[str],
              n_classes: int = 3, ties: np.ndarray | None = None, weight: np.ndarray | None = None,
              grid: Sequence[float] = L2_GRID, n_folds: int = CV_FOLDS, seed: int = 0,
              features: str = FEATURES) -> tuple[float, dict[float, float]]:
    """The penalty of `grid` with the lowest k-fold log loss (folds grouped by `groups`, e.g. prompt keys,
    and stratified; swap-averaged logits as the model predicts), and every candidate's CV log loss.
    Ties go to the larger penalty. Too few rows for `n_folds` folds: the grid's middle value."""
    from pref_lightning.data.folds import assign_folds, fold_split

    scored = np.ones(len(labels), bool) if ties is None else np.asarray(ties, bool)  # tie-less rows can't score ties
    if len(set(groups)) < 2 * n_folds or scored.sum() < 10 * n_folds:
        middle = float(grid[len(grid) // 2])
        return middle, {}
    folds = assign_folds(list(groups), labels, n_folds, seed, n_classes=n_classes)
    losses = {}
    for l2 in grid:
        total = 0.0
        for k in range(n_folds):
            tr, va = (np.asarray(i, dtype=np.int64) for i in fold_split(folds, k))
            va = va[scored[va]]
            anchor = _fit(stats_a[tr], stats_b[tr], labels[tr], n_classes, l2,
                          None if ties is None else ties[tr], None if weight is None else weight[tr], features)
            probs = class_probabilities(torch.from_numpy(anchor_logits(anchor, stats_a[va], stats_b[va])))
            total += float(competition_log_loss(probs, torch.from_numpy(labels[va]))) * len(va)
        losses[float(l2)] = float(total / scored.sum())
    best = min(losses.values())
    return max(l2 for l2, loss in losses.items() if loss <= best + 1e-9), losses


def fit_anchor(stats_a: np.ndarray, stats_b: np.ndarray, labels: np.ndarray, n_classes: int = 3,
               l2: float | None = None, ties: np.ndarray | None = None, weight: np.ndarray | None = None,
               groups: Sequence[str] | None = None, features: str = FEATURES) -> dict[str, Any]:
    """Fit the offset on normalised statistics (n, n_stats) of both sides and labels (n,), with the training
    loss of the network (losses.py) when rows carry `ties` (n,) bool or loss `weight` (n,). `l2` None: chosen
    by `choose_l2` over folds grouped by `groups` (n,) (default: one group per row). `features`: FEATURES,
    or "a,b,diff" (without |a - b|, as anchors were fitted before; for ablations).

    Returns {"weight": (4 n_stats, K) nested list, "bias": (K,) list, "features", "l2", "cv_log_loss"}:
    a linear map on `anchor_features`, the penalty used and the inner-CV log loss of each candidate.
    """
    cv: dict[float, float] = {}
    if l2 is None:
        groups = [str(i) for i in range(len(labels))] if groups is None else list(groups)
        l2, cv = choose_l2(stats_a, stats_b, labels, groups, n_classes, ties, weight, features=features)
    anchor = _fit(stats_a, stats_b, labels, n_classes, float(l2), ties, weight, features)
    return {**anchor, "l2": float(l2), "cv_log_loss": {str(k): v for k, v in cv.items()}}


class AnchorOffset(nn.Module):
    """Linear logits of the statistics, initialised from `fit_anchor`'s weights; frozen unless `trainable`."""

    def __init__(self, anchor: dict[str, Any], trainable: bool = False) -> None:
        super().__init__()
        weight = torch.tensor(anchor["weight"], dtype=torch.float32)
        self.features = str(anchor.get("features", "a,b,diff"))
        self.linear = nn.Linear(weight.shape[0], weight.shape[1])
        self.reset(anchor)
        self.linear.requires_grad_(trainable)

    @torch.no_grad()
    def reset(self, anchor: dict[str, Any]) -> None:
        """Set the weights to the fitted regression `anchor` (`fit_anchor`'s dict)."""
        self.linear.weight.copy_(torch.tensor(anchor["weight"], dtype=torch.float32).T)
        self.linear.bias.copy_(torch.tensor(anchor["bias"], dtype=torch.float32))

    def forward(self, stats_a: torch.Tensor, stats_b: torch.Tensor) -> torch.Tensor:
        return self.linear(anchor_features(stats_a.float(), stats_b.float(), self.features))


def anchor_logits(anchor: dict[str, Any], stats_a: np.ndarray, stats_b: np.ndarray, tta_swap: bool = True) -> np.ndarray:
    """(n, K) logits of the offset alone (the anchored model at step 0), averaged over both orders as swap
    TTA does when `tta_swap`."""
    weight, bias = np.asarray(anchor["weight"]), np.asarray(anchor["bias"])
    features = str(anchor.get("features", "a,b,diff"))
    logits = anchor_features(stats_a, stats_b, features) @ weight + bias
    if tta_swap:
        swap = list(SWAP[: weight.shape[1]])
        logits = 0.5 * (logits + (anchor_features(stats_b, stats_a, features) @ weight + bias)[:, swap])
    return logits


def anchor_log_loss(anchor: dict[str, Any], stats_a: np.ndarray, stats_b: np.ndarray, labels: np.ndarray,
                    tta_swap: bool = True, floor: float = 0.0) -> float:
    """Log loss (nats) on `labels` of the offset alone with the model's probability floor: the anchored
    model's step-0 validation loss, the baseline its training must beat."""
    probs = class_probabilities(torch.from_numpy(anchor_logits(anchor, stats_a, stats_b, tta_swap)), floor=floor)
    return float(competition_log_loss(probs, torch.from_numpy(labels)))


def fit_anchor_on(data: Any, l2: float | None = None, rows: str = "train_file", side_columns: Any = None,
                  **options: Any) -> dict[str, Any]:
    """The anchored head's offset fitted on a set-up datamodule's training rows (`data.anchor_rows(rows)`,
    see there for `rows`), its L2 penalty chosen by CV grouped by prompt unless `l2` is given; `options` go to
    `fit_anchor`. `side_columns` (encoded pairs -> per-side columns (n, c) of A and of B, e.g. a frozen stage's
    text scores, `stages.score_columns`) adds columns to the statistics the regression reads. The returned
    dict also records `rows`. Raises UserError for an unknown `rows`."""
    found = data.anchor_rows(rows)
    stats_a, stats_b = found["stats_a"], found["stats_b"]
    if side_columns is not None:
        extra_a, extra_b = side_columns(found["pairs"])
        stats_a, stats_b = np.concatenate([stats_a, extra_a], 1), np.concatenate([stats_b, extra_b], 1)
    anchor = fit_anchor(stats_a, stats_b, found["labels"], n_classes=found["n_classes"], l2=l2, ties=found["ties"],
                        weight=found["weight"], groups=found["groups"], **options)
    log.info("anchored head: statistics%s regression on %d %s rows, L2 %.3g%s",
             "" if side_columns is None else " + text score", len(found["labels"]),
             "training-file" if rows == "train_file" else "training", anchor["l2"],
             "" if not anchor["cv_log_loss"] else " (inner CV log loss " + ", ".join(
                 f"{k}: {v:.4f}" for k, v in anchor["cv_log_loss"].items()) + ")")
    return {**anchor, "rows": rows}
