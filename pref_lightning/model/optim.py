"""Optimisation: AdamW over layer-wise parameter groups (backbone layer i at lr * layer_lr_decay **
(n_layers - i), no weight decay on biases and norms, the head at its own LR) and the warmup + decay schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pref_lightning.core.errors import UserError


def warmup_decay(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine or linear decay to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise UserError(f"model.schedule={schedule!r}; choose cosine, linear or constant")


def backbone_depths(backbone: nn.Module) -> dict[str, int]:
    """Depth of each backbone parameter: 0 embeddings, i+1 for layer i, top for the rest."""
    n_layers = int(getattr(backbone.config, "num_hidden_layers", 0))
    depths = {}
    for name, _ in backbone.named_parameters():
        depth = n_layers
        if "embeddings" in name and "rel_embeddings" not in name:
            depth = 0
        else:
            for part in (".layer.", ".layers."):
                if part in name:
                    depth = int(name.split(part)[1].split(".")[0]) + 1
                    break
        depths[name] = depth
    return depths


def parameter_groups(backbone: nn.Module, head_params: Iterable[nn.Parameter], lr: float, head_lr: float,
                     weight_decay: float, layer_lr_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: one per (backbone depth, decayed or not), named
    `backbone_d<depth>[_no_decay]`, and `head` (head and anchor, no weight decay). Empty groups left out."""
    top = int(getattr(backbone.config, "num_hidden_layers", 0))
    depths = backbone_depths(backbone)
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "LayerNorm" in name or "bias" in name
        buckets.setdefault((depths[name], no_decay), []).append(param)
    groups = [
        {"params": params, "lr": lr * layer_lr_decay ** (top - depth),
         "weight_decay": 0.0 if no_decay else weight_decay,
         "name": f"backbone_d{depth}" + ("_no_decay" if no_decay else "")}
        for (depth, no_decay), params in sorted(buckets.items())
    ]
    groups.append({"params": [p for p in head_params if p.requires_grad], "lr": head_lr,
                   "weight_decay": 0.0, "name": "head"})
    return [g for g in groups if g["params"]]


def optimizer_and_schedule(groups: list[dict[str, Any]], lr: float, total_steps: int, warmup_ratio: float,
                           schedule: str, min_lr_ratio: float) -> dict[str, Any]:
    """What `configure_optimizers` returns: AdamW over `groups` and a per-step `warmup_decay` schedule
    over `total_steps` optimiser steps (at least 1), warming up over their `warmup_ratio` share."""
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = max(1, int(total_steps))
    warmup = int(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, warmup, total, schedule, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
