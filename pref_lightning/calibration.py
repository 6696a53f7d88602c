"""Temperature scaling fitted on validation logits (one scalar; keeps the argmax, fixes confidence)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (LBFGS on log T, in float64)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().exp())
    return value if math.isfinite(value) and value > 0 else 1.0


@torch.no_grad()
def collect_logits(model, batches: Iterable[Mapping[str, torch.Tensor]], tta_swap: bool,
                   return_index: bool = False) -> tuple[torch.Tensor, ...]:
    """Uncalibrated logits and labels of every batch's real rows in float32 (and each row's dataset index),
    on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    all_logits, all_labels, all_index = [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        valid = batch.get("valid")  # DDP padding rows (False) are scored with the batch, then dropped
        keep = slice(None) if valid is None else valid
        all_logits.append(model(batch, tta_swap=tta_swap).float()[keep].cpu())
        all_labels.append(batch["labels"][keep].cpu())
        all_index.append(batch["index"][keep].cpu())
    model.train(was_training)
    out = (torch.cat(all_logits), torch.cat(all_labels))
    return (*out, torch.cat(all_index)) if return_index else out
