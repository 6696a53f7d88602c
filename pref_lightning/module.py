"""LightningModule: shared backbone encodes both sides, `PairHead` turns them into 3 logits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pref_lightning.backbone import build_backbone, tokenizer_from_files
from pref_lightning.head import PairHead, pool, pooled_size
from pref_lightning.metrics import LogLoss

CHECKPOINT_KEY = "pref_lightning"
CHECKPOINT_FORMAT = 1


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
    raise ValueError(f"model.schedule={schedule!r}; choose cosine, linear or constant")


class PreferenceModule(L.LightningModule):
    """Siamese preference model; every constructor argument is a plain value saved in hparams."""

    def __init__(
        self,
        backbone: str = "tiny",
        tiny_config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        backbone_dropout: float | None = 0.0,
        pooling: str = "mean",
        combine: Sequence[str] = ("a", "b", "diff", "prod"),
        head_hidden: int = 256,
        head_dropout: float = 0.0,
        lr: float = 2e-5,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        backbone_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone_config"])
        self.backbone = build_backbone(backbone, vocab_size=vocab_size, tiny_overrides=tiny_config,
                                       config_dict=backbone_config, dropout=backbone_dropout)
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        hidden = self.backbone.config.hidden_size
        self.head = PairHead(pooled_size(hidden, pooling), combine, head_hidden, head_dropout)
        self.val_log_loss = LogLoss()
        self.val_accuracy = MulticlassAccuracy(num_classes=3, average="micro")
        self.train_log_loss = LogLoss()
        # set by the pipeline; travel inside every checkpoint so prediction needs nothing else
        self.tokenizer_files: dict[str, bytes] = {}
        self.data_settings: dict[str, Any] = {}
        self.reference: dict[str, float] = {}

    # ---- runtime ------------------------------------------------------------------------------
    def _flush_denormals(self) -> None:
        # Denormal floats in trained weights made CPU steps up to 6x slower; some lazily imported
        # libraries reset the flag, so it is set again at the start of every loop.
        torch.set_flush_denormal(True)

    def on_fit_start(self) -> None:
        self._flush_denormals()

    def on_train_epoch_start(self) -> None:
        self._flush_denormals()

    def on_validation_epoch_start(self) -> None:
        self._flush_denormals()

    def on_predict_epoch_start(self) -> None:
        self._flush_denormals()

    # ---- forward ------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.hparams.pooling)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.encode(batch["input_ids"], batch["attention_mask"]).float()
        n = pooled.shape[0] // 2
        return self.head(pooled[:n], pooled[n:])

    # ---- steps --------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        self.train_log_loss(logits.detach().softmax(-1), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log("train/log_loss", self.train_log_loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        probs = logits.softmax(-1)
        self.val_log_loss(probs, batch["labels"])
        self.val_accuracy(probs, batch["labels"])
        size = len(batch["labels"])
        self.log("val/log_loss", self.val_log_loss, prog_bar=True, batch_size=size)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.reference.items():
            self.log(f"val/{name}", float(value), sync_dist=False)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch).float()
        return {"index": batch["index"], "logits": logits}

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "bias" in name else decay).append(param)
        head_params = [p for p in self.head.parameters() if p.requires_grad]
        hp = self.hparams
        groups = [
            {"params": decay, "lr": hp.lr, "weight_decay": hp.weight_decay, "name": "backbone"},
            {"params": no_decay, "lr": hp.lr, "weight_decay": 0.0, "name": "backbone_no_decay"},
            {"params": head_params, "lr": hp.head_lr, "weight_decay": 0.0, "name": "head"},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_decay(step, warmup, total, hp.schedule, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- self-contained checkpoints -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "backbone_config": self.backbone.config.to_dict(),
            "tokenizer_files": dict(self.tokenizer_files),
            "data_settings": dict(self.data_settings),
            "reference": dict(self.reference),
        }

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu") -> tuple[PreferenceModule, Any, dict[str, Any]]:
        """Rebuild (module, tokenizer, data settings) from one checkpoint file, offline."""
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is None:
            raise ValueError(f"{path}: not a pref-lightning checkpoint (no '{CHECKPOINT_KEY}' entry)")
        hparams = dict(checkpoint["hyper_parameters"])
        module = cls(**hparams, backbone_config=payload["backbone_config"])
        module.load_state_dict(checkpoint["state_dict"])
        module.tokenizer_files = dict(payload["tokenizer_files"])
        module.data_settings = dict(payload["data_settings"])
        module.reference = dict(payload["reference"])
        tokenizer = tokenizer_from_files(payload["tokenizer_files"])
        return module, tokenizer, module.data_settings
