"""The competition's classes and metric, in one place: class columns, the A/B swap, the log loss
(Kaggle's clip, one EPS) for tensors, numpy arrays and as a DDP-safe torchmetrics Metric, the class
prior and its log loss, and the output guard every probability reported or written goes through."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from pref_lightning.core.errors import UserError

# the submission's probability columns (and the training file's label columns), in class order
CLASS_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_LABELS = ("A", "B", "tie")  # the same classes, short (logs, reports, plots)
SWAP = (1, 0, 2)  # class order after exchanging answers A and B (a binary task uses the first two)
EPS = 1e-15  # Kaggle clips probabilities to [EPS, 1 - EPS]
# the default probability floor (model.prob_floor): what no class probability may fall below
PROB_FLOOR = 0.002


def check_floor(floor: float, n_classes: int) -> float:
    """`floor` as a float, refused unless 0 <= floor < 1 / n_classes (UserError)."""
    floor = float(floor)
    if not 0.0 <= floor < 1.0 / n_classes:
        raise UserError(f"model.prob_floor={floor}: need 0 <= floor < 1/{n_classes}")
    return floor


def mix_floor(probs, floor: float):
    """`probs` (..., K) mixed with the uniform distribution so that every class gets at least `floor`:
    floor + (1 - K * floor) * probs. Works on tensors and numpy arrays.

    Why: a model (or an input far outside the training range) can put ~1e-8 on a class, and one such
    row labelled with that class costs up to 34.5 nats under Kaggle's 1e-15 clip. Mixing with the
    uniform distribution costs nothing to first order for a calibrated model (E_y[u_y / p_y] = 1).
    """
    if not floor:
        return probs
    return floor + (1.0 - probs.shape[-1] * floor) * probs


def class_probabilities(logits: torch.Tensor, temperature: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """(n, K) probabilities from (n, K) logits: softmax(logits / temperature), then `mix_floor`."""
    return mix_floor((logits.float() / temperature).softmax(-1), floor)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of numpy (n, K) logits (max-shifted), float64 for float64 input; the numpy twin of
    `class_probabilities` for the regressions, the synthetic oracle and ensembles."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def competition_log_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean negative log likelihood as Kaggle scores it: each row divided by its sum, then clipped."""
    probs = probs.double()
    probs = (probs / probs.sum(dim=-1, keepdim=True)).clamp(eps, 1 - eps)
    return -probs.gather(-1, target.view(-1, 1)).log().mean()


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = EPS) -> float:
    """`competition_log_loss` of numpy (n, K) probabilities and (n,) integer labels, as a float."""
    # copies: a read-only array (np.broadcast_to, a file's buffer) handed to torch.as_tensor makes torch warn
    # "The given NumPy array is not writable" on every run
    return float(competition_log_loss(torch.tensor(np.asarray(probs, dtype=np.float64)),
                                      torch.tensor(np.asarray(labels, dtype=np.int64)), eps))


def class_prior(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """(K,) class frequencies of integer `labels`."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return counts / counts.sum()


def gain_over(reference_log_loss: float, log_loss_value: float) -> float:
    """How many nats a model's log loss is below a reference predictor's (the prior, uniform, a baseline) on
    the same rows: positive when the model is better. The one definition of every `gain_over_*` figure."""
    return float(reference_log_loss) - float(log_loss_value)


def prior_log_loss(train_labels: np.ndarray, eval_labels: np.ndarray, n_classes: int = 3) -> float:
    """Log loss on `eval_labels` of always predicting the class frequencies of `train_labels`."""
    prior = class_prior(train_labels, n_classes)
    return log_loss(np.broadcast_to(prior, (len(eval_labels), n_classes)), eval_labels)


class LogLoss(Metric):
    """Multiclass log loss accumulated over batches (and processes) as a sum and a count."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = EPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if target.numel() == 0:  # a batch of padding rows only (a DDP rank with no rows of its own)
            return
        self.total += competition_log_loss(probs, target, self.eps) * target.numel()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class PaddingEfficiency(Metric):
    """Real tokens / processed tokens (attention-mask ones / its size) over batches and processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("real", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("processed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, attention_mask: torch.Tensor, processed: int | None = None) -> None:
        """`processed`: token positions really run (default: the mask's size, one padded call)."""
        self.real += attention_mask.sum()
        self.processed += attention_mask.numel() if processed is None else int(processed)

    def compute(self) -> torch.Tensor:
        return (self.real / self.processed.clamp(min=1)).float()
