"""Building blocks shared by the training and prediction recipes (`training.py`, `prediction.py`)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from pref_lightning.backbone import TINY, cached_trained_tokenizer, load_tokenizer, tokenizer_from_files
from pref_lightning.datamodule import PreferenceDataModule
from pref_lightning.stages import read_init


def set_runtime_defaults() -> None:
    # TF32 matmuls on GPUs that have them (flushing CPU denormals is done by the module's loop hooks)
    torch.set_float32_matmul_precision("high")


def build_tokenizer(model_cfg: DictConfig, datamodule: PreferenceDataModule):
    """The tokenizer named by the model config; for the tiny backbone, one trained on the train texts; with
    `model.init_from`, the tokenizer stored in that checkpoint (the ids its weights were trained on)."""
    if model_cfg.get("init_from"):
        return tokenizer_from_files(read_init(model_cfg.init_from)["tokenizer_files"])
    if model_cfg.backbone == TINY and not model_cfg.get("tokenizer"):
        return cached_trained_tokenizer(datamodule.tokenizer_texts(), int(model_cfg.tokenizer_vocab_size),
                                        model_cfg.get("cache_dir"))
    return load_tokenizer(model_cfg.get("tokenizer") or model_cfg.backbone)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers); skip the rest."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
