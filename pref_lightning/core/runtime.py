"""Process-wide settings and Hydra helpers shared by the training and prediction recipes."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def set_runtime_defaults() -> None:
    # TF32 matmuls on GPUs that have them (flushing CPU denormals is done by the module's loop hooks)
    torch.set_float32_matmul_precision("high")


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers); skip the rest."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
