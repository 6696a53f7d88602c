"""Training losses: tie-aware rows, per-row loss weights, soft targets (distillation, pseudo-labels).

Classes are (A wins, B wins, tie) with K = 3, or (A wins, B wins) with K = 2. Every training row has

- a hard `label` (0 A, 1 B, 2 tie);
- a `ties` flag: False for a row from a source whose labels never say "tie" (HH-RLHF, chosen/rejected
  sets). Such a row says which answer is better, nothing about how often answers tie, so its loss is the
  conditional likelihood of the winner given "not a tie", -log(P(w) / (P(A) + P(B))): the cross-entropy
  over the A/B logits alone. The tie logit receives exactly zero gradient from it;
- a loss `weight` (its source's `loss_weight`, default 1);
- optionally a target distribution (soft labels): `mix_targets` folds a teacher's probabilities and the
  hard label into one target, (1 - w) one_hot(label) + w p_teacher, whose cross-entropy is exactly
  (1 - w) CE(hard) + w CE(teacher), since cross-entropy is linear in the target.

The batch loss is the mean over rows of weight x row loss (a weight scales its rows' gradient whatever
else shares the batch; with every weight 1 it is the plain mean, as before).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pref_lightning.core.errors import UserError

TEACHER_MISSING = ("error", "hard")


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(n, K) probabilities p -> p^(1/T), renormalised per row. As log p = logit - logsumexp(logit), this
    equals softmax(logit / T): the usual distillation temperature, applied to a file of probabilities
    (T > 1 softens, T < 1 sharpens, T = 1 changes nothing). UserError unless T > 0."""
    if not temperature > 0:
        raise UserError(f"data.teacher_temperature={temperature} must be > 0")
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs, 1e-30, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=1, keepdims=True)


def mix_targets(labels: np.ndarray, soft: np.ndarray, weight: float, ties: np.ndarray | None = None) -> np.ndarray:
    """(n, K) float32 targets (1 - weight) * one_hot(labels) + weight * soft, from labels (n,) and soft
    targets (n, K); a row of `soft` that has a NaN (no teacher row) gets its one-hot label alone. A row with
    `ties` (n,) bool False takes the teacher's conditional P(A | not tie), P(B | not tie) (tie column 0), so
    its loss is (1 - weight) CE(hard) + weight CE(teacher), both over the A/B logits."""
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"data.teacher_weight={weight} must lie in [0, 1]")
    k = soft.shape[1]
    hard = np.eye(k, dtype=np.float64)[labels]
    missing = np.isnan(soft).any(axis=1)
    if ties is not None and k == 3 and not ties.all():
        ab = soft[:, :2] / np.clip(soft[:, :2].sum(axis=1, keepdims=True), 1e-12, None)
        soft = np.where(ties[:, None], soft, np.concatenate([ab, np.zeros((len(soft), 1))], axis=1))
    mixed = (1.0 - weight) * hard + weight * np.where(missing[:, None], hard, soft)
    return mixed.astype(np.float32)


def row_losses(logits: torch.Tensor, labels: torch.Tensor, ties: torch.Tensor | None = None,
               targets: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row losses (n,) of logits (n, K), labels (n,) long, ties (n,) bool (None: every row may tie)
    and targets (n, K) probabilities (None: the one-hot labels).

    A row with `ties` True: cross-entropy over the K classes. A row with `ties` False (K = 3; its label
    must be 0 or 1): cross-entropy over the A/B logits only, to its target's A/B part renormalised.
    `label_smoothing` is F.cross_entropy's (over K classes, or over A/B for a tie-less row)."""
    target = labels if targets is None else targets.to(logits.dtype)
    full = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    if ties is None or logits.shape[1] < 3 or bool(ties.all()):
        return full
    if targets is None:
        pair_target = labels.clamp(max=1)  # the rows using it have label 0 or 1
    else:
        ab = target[:, :2]
        pair_target = ab / ab.sum(dim=1, keepdim=True).clamp_min(1e-12)
    conditional = F.cross_entropy(logits[:, :2], pair_target, reduction="none", label_smoothing=label_smoothing)
    return torch.where(ties.to(logits.device), full, conditional)


def preference_loss(logits: torch.Tensor, labels: torch.Tensor, ties: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Scalar training loss: mean over rows of weight (n,) x `row_losses` (see there for the shapes);
    `weight` None: every row 1 (the plain mean cross-entropy)."""
    losses = row_losses(logits, labels, ties, targets, label_smoothing)
    if weight is not None:
        losses = losses * weight.to(losses)
    return losses.mean()


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, batch, targets: torch.Tensor | None = None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """`preference_loss` with the batch's optional per-row `ties` and `weight` (see `PairCollator`);
    `labels` and `targets` are passed separately because swap augmentation exchanges them."""
    return preference_loss(logits, labels, batch.get("ties"), batch.get("weight"), targets, label_smoothing)
