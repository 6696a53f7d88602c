"""Temperature scaling fitted on validation logits (one scalar; keeps the argmax, fixes confidence)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pref_lightning.core.metrics import EPS, mix_floor

# Bounds of the fitted temperature. An unbounded fit on a model worse than uniform runs away (2.4e6 was
# seen on a mixed-source run): the "calibrated" model is then exactly uniform and hides the failure.
TEMPERATURE_RANGE = (0.1, 10.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100, floor: float = 0.0,
                    bounds: tuple[float, float] = TEMPERATURE_RANGE) -> float:
    """The T in `bounds` minimising the NLL of mix_floor(softmax(logits / T), floor) (LBFGS on log T,
    float64; the unconstrained optimum clipped to `bounds`, the NLL being unimodal in T).

    Source: Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017), temperature scaling.
    """
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        if floor:
            loss = F.nll_loss(mix_floor(scaled.softmax(-1), floor).clamp_min(EPS).log(), labels)
        else:
            loss = F.cross_entropy(scaled, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().exp())
    value = value if math.isfinite(value) and value > 0 else 1.0
    return min(max(value, bounds[0]), bounds[1])
