"""LightningModule: the network (network.py) plus the training loop around it: steps, swap augmentation
(augment.py), metrics, optimiser and schedule (optim.py), self-contained checkpoints.

`PreferenceModule` is a `PreferenceNetwork` (its parent class, not a submodule), so the parameters keep
the names they had before the split (`backbone.*`, `head.*`...) and every older checkpoint loads as is."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pref_lightning.core.cli import say
from pref_lightning.core.errors import UserError
from pref_lightning.core.losses import batch_loss
from pref_lightning.core.metrics import PROB_FLOOR, LogLoss, PaddingEfficiency
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.tokenizers import tokenizer_from_files
from pref_lightning.model.augment import SWAP_MODES, augment_generator, flip_coins, swap_labels, swap_sides
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, load_checkpoint, payload, without_unused_weights
from pref_lightning.model.head import RELEVANCE_TEMPERATURE, VERDICT_TOKENS, relevance_loss
from pref_lightning.model.lora import check_base, trainable_summary, with_base_weights, without_base_weights
from pref_lightning.model.network import PACKABLE_MODEL_TYPES, PACKED_MODES, PreferenceNetwork
from pref_lightning.model.optim import backbone_depths, optimizer_and_schedule, parameter_groups, warmup_decay

__all__ = ["PACKABLE_MODEL_TYPES", "PACKED_MODES", "SWAP_MODES", "PreferenceModule", "training_sources", "valid_rows", "warmup_decay"]
# the constructor arguments that build the network (the rest are training settings and data facts)
NETWORK_ARGUMENTS = tuple(name for name in inspect.signature(PreferenceNetwork.__init__).parameters if name != "self")


def valid_rows(batch: Mapping[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """`values` (one per row of `batch`) without the DDP padding rows (`batch["valid"]` False)."""
    valid = batch.get("valid")
    return values if valid is None else values[valid.to(values.device)]


def training_sources(batch: Mapping[str, torch.Tensor], head: torch.nn.Module, n: int) -> torch.Tensor | None:
    """Each row's training source (n,) (model.source_heads: its own output layer). A batch of training-file
    rows only carries none: zeros then, so that every output layer stays in the graph of every step (DDP
    requires each parameter to be used, whatever sources a batch holds)."""
    source = batch.get("source")
    if source is None and getattr(head, "source_outputs", None) is not None:
        source = torch.zeros(n, dtype=torch.long, device=batch["labels"].device)
    return source


class PreferenceModule(PreferenceNetwork, L.LightningModule):
    """Siamese preference model; every constructor argument is a plain value saved in hparams.

    The network's arguments (network.py) come first; then optimisation (`lr` ... `min_lr_ratio`,
    `layer_lr_decay`), augmentation (`swap_augment`, `augment_seed`), the loss (`label_smoothing`), data
    facts (`train_prior`: the training split's class frequencies; `reference`: reference log losses on the
    validation rows, logged beside val/log_loss), `lineage`, and settings of the training recipe that the
    model config carries and the module only records (`tokenizer*`, `cache_dir`: how the tokenizer was
    chosen; `anchor_l2`, `anchor_rows`: how the anchor was fitted; `anchor_fallback`, `init_from`), so that
    `hydra.utils.instantiate(cfg.model, spec=..., ...)` takes the whole model config."""

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
        use_text_stats: bool = True,
        symmetric_head: bool | str = False,
        swap_augment: str = "random",
        tta_swap: bool = True,
        layer_lr_decay: float = 1.0,
        freeze_embeddings: bool = False,
        compile: bool = False,
        augment_seed: int = 0,
        compile_backend: str = "inductor",
        backbone_config: Mapping[str, Any] | None = None,
        prob_floor: float = PROB_FLOOR,
        anchor_head: bool = False,
        anchor_trainable: bool = False,
        anchor: Mapping[str, Any] | None = None,
        spec: EncodingSpec | Mapping[str, Any] | None = None,
        train_prior: Sequence[float] | None = None,
        reference: Mapping[str, float] | None = None,
        tokenizer_files: Mapping[str, bytes] | None = None,
        label_smoothing: float = 0.0,
        lora: Mapping[str, Any] | None = None,
        attn_implementation: str | None = None,
        backbone_dtype: str | None = None,
        side_groups: int = 4,
        reward_score: bool = False,
        packed: bool | str = "auto",
        lineage: Sequence[Mapping[str, Any]] | None = None,
        text_anchor: Mapping[str, Any] | None = None,
        anchor_blend: float = 1.0,
        head: str = "mlp",
        verdict_tokens: Sequence[str] = VERDICT_TOKENS,
        attn_softcapping: bool | None = None,
        interaction: str = "none",
        source_heads: bool = False,
        relevance_weight: float = 0.0,
        relevance_temperature: float = RELEVANCE_TEMPERATURE,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int | None = None,
        cache_dir: str | None = None,
        anchor_l2: float | None = None,
        anchor_rows: str = "train_file",
        anchor_fallback: bool = False,
        init_from: str | None = None,
    ) -> None:
        if swap_augment not in SWAP_MODES:
            raise UserError(f"model.swap_augment={swap_augment!r}; choose from {', '.join(SWAP_MODES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing={label_smoothing} must lie in [0, 1)")
        if relevance_weight < 0 or (relevance_weight > 0 and interaction != "prompt_answer_embeddings"):
            raise UserError(f"model.relevance_weight={relevance_weight}: a weight >= 0, and > 0 only with "
                            "model.interaction=prompt_answer_embeddings (it shapes the token embeddings that "
                            "interaction compares)")
        if relevance_temperature <= 0:
            raise UserError(f"model.relevance_temperature={relevance_temperature} must be > 0")
        if text_anchor is not None and not isinstance(text_anchor, Mapping):
            raise UserError(f"model.text_anchor={text_anchor!r}: a checkpoint path is read by the training recipe "
                            "(train.training.build_model); the module takes what stages.read_text_scorer returns")
        arguments = locals()
        super().__init__(**{name: arguments[name] for name in NETWORK_ARGUMENTS})
        self.train_prior = [float(p) for p in (train_prior or [])]
        self.reference = {str(k): float(v) for k, v in (reference or {}).items()}
        # save_hyperparameters reads these locals: plain values only. The tokenizer's files travel in the
        # checkpoint payload instead (loggers write hyperparameters as YAML).
        spec, train_prior, reference = self.spec.to_dict(), self.train_prior, self.reference
        self.save_hyperparameters(ignore=["backbone_config", "tokenizer_files"])
        n_classes = self.spec.n_classes
        self.val_log_loss = LogLoss()
        self.val_accuracy = MulticlassAccuracy(num_classes=n_classes, average="micro")
        self.train_log_loss = LogLoss()
        # real / processed tokens of the epoch: a summed metric that Lightning syncs with the others
        self.train_padding = PaddingEfficiency()

    # ---- runtime ------------------------------------------------------------------------------
    def _flush_denormals(self) -> None:
        # Denormal floats in trained weights made CPU steps up to 6x slower; some lazily imported
        # libraries reset the flag, so it is set again at the start of every loop.
        torch.set_flush_denormal(True)

    def on_fit_start(self) -> None:
        self._flush_denormals()
        if self.base_model is not None and self.trainer.is_global_zero:
            say(f"{trainable_summary(self)}")

    def on_train_epoch_start(self) -> None:
        self._flush_denormals()
        # Lightning sets the epoch only on plain and distributed samplers; ours is a batch sampler
        batch_sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(self.current_epoch)

    # Under DDP no hook here issues a collective itself (no strategy.reduce / all_gather): the progress
    # bar on rank 0 alone computes (syncs) logged metrics in on_train_epoch_end before the module's hook
    # runs, so a collective in an epoch-end hook meets a different one on the other ranks and every
    # rank waits forever. Cross-rank sums travel as logged torchmetrics states, synced by Lightning in
    # the same order on every rank.

    def on_validation_epoch_start(self) -> None:
        self._flush_denormals()
        self._validation_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def validation_outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uncalibrated logits (n, K) float32, labels (n,) and validation-set indices (n,) of the real rows
        this rank scored in its last validation loop, on the CPU: what calibration, `oof.csv` and the
        report use, so that no second pass over the validation set is needed (on the run's accelerator
        and precision, unlike a pass after `trainer.validate`, whose teardown moves the model to the CPU)."""
        rows = getattr(self, "_validation_rows", [])
        if not rows:
            k = self.n_classes
            return torch.zeros(0, k), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return tuple(torch.cat([row[i] for row in rows]).cpu() for i in range(3))

    def on_predict_epoch_start(self) -> None:
        self._flush_denormals()

    # ---- steps --------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels, targets = batch["labels"], batch.get("targets")
        swap = torch.tensor(self.swap_index, device=labels.device)
        mode = self.hparams.swap_augment
        if self.is_cross:
            return self._cross_training_step(batch, batch_idx, labels, targets, swap, mode)
        a, b, stats_a, stats_b = self.side_vectors(batch)
        self._log_padding(batch["attention_mask"])
        if mode == "random":
            # each pair is seen as (A, B) or (B, A) with labels exchanged; the backbone pass is shared
            flip = flip_coins(len(labels), self._augment_generator(batch_idx), labels.device)
            a, b, stats_a, stats_b = swap_sides(flip, a, b, stats_a, stats_b)
            labels, targets = swap_labels(flip, labels, targets, swap)
        source = training_sources(batch, self.head, len(labels))
        logits = self.pair_logits(a, b, stats_a, stats_b, source)
        loss = self._loss(logits, labels, batch, targets)
        if self.hparams.relevance_weight > 0:  # label-free: every row teaches the prompt-answer match
            relevance = relevance_loss(self.backbone.get_input_embeddings()(batch["input_ids"]), batch["input_ids"],
                                       batch["attention_mask"], self.hparams.relevance_temperature)
            self.log("train/relevance_loss", relevance, batch_size=len(labels))
            loss = loss + self.hparams.relevance_weight * relevance
        if mode == "full":  # both orders in the same step
            swapped = None if targets is None else targets[:, swap]
            loss = 0.5 * (loss + self._loss(self.pair_logits(b, a, stats_b, stats_a, source), swap[labels], batch,
                                            swapped))
        return self._log_train(logits, labels, loss)

    def _cross_training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, labels: torch.Tensor,
                             targets: torch.Tensor | None, swap: torch.Tensor, mode: str) -> torch.Tensor:
        """Cross layout: `random` runs each pair in one order drawn by a coin (B rows), `full` in both (2B
        rows, mean of both losses), `none` as (A, B): the exchanged row is another sequence, its own pass."""
        n = len(labels)
        device = batch["input_ids"].device
        if mode == "random":
            flip = flip_coins(n, self._augment_generator(batch_idx), device)
            rows = torch.arange(n, device=device) + n * flip.long()
            labels, targets = swap_labels(flip, labels, targets, swap)
        else:
            rows = torch.arange(2 * n if mode == "full" else n, device=device)
        source = training_sources(batch, self.head, n)
        logits = self.cross_logits(batch, rows, source)
        self._log_padding(batch["attention_mask"][rows])
        if mode != "full":
            return self._log_train(logits, labels, self._loss(logits, labels, batch, targets))
        swapped = None if targets is None else targets[:, swap]
        loss = 0.5 * (self._loss(logits[:n], labels, batch, targets)
                      + self._loss(logits[n:], swap[labels], batch, swapped))
        return self._log_train(logits[:n], labels, loss)

    def _log_padding(self, attention_mask: torch.Tensor) -> None:
        """Real tokens / token positions the backbone really ran over (grouped sides: less than the mask)."""
        self.train_padding.update(attention_mask, processed=self.last_processed_tokens)
        self.log("train/padding_efficiency", self.train_padding, on_step=False, on_epoch=True)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: Mapping[str, torch.Tensor],
              targets: torch.Tensor | None) -> torch.Tensor:
        """Training loss (losses.py): tie-less rows conditional on "not a tie", per-row weights, soft targets."""
        return batch_loss(logits, labels, batch, targets, self.hparams.label_smoothing)

    def _augment_generator(self, batch_idx: int) -> torch.Generator:
        """The swap coins' generator of this batch (augment.augment_generator)."""
        return augment_generator(self.hparams.augment_seed, self.current_epoch, batch_idx, self.global_rank)

    def _log_train(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        if loss is None:
            loss = F.cross_entropy(logits, labels)
        self.train_log_loss(logits.detach().softmax(-1), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/log_loss", self.train_log_loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits of the batch's real rows: DDP padding rows (`valid` False) are scored, then dropped."""
        logits = valid_rows(batch, self(batch, tta_swap=self.evaluation.tta_swap))
        labels = valid_rows(batch, batch["labels"])
        if hasattr(self, "_validation_rows"):
            self._validation_rows.append((logits.detach().float(), labels.detach(),
                                          valid_rows(batch, batch["index"]).detach()))
        if len(labels):  # a rank with no rows of its own runs a batch of padding only
            probs = self.probabilities(logits)
            self.val_log_loss.update(probs, labels)
            self.val_accuracy.update(probs, labels)
        # logged on every rank at every step, so every rank syncs the same metrics at the epoch's end
        self.log("val/log_loss", self.val_log_loss, prog_bar=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)
        return logits

    def on_validation_epoch_end(self) -> None:
        for name, value in self.reference.items():
            self.log(f"val/{name}", float(value), sync_dist=False)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch, tta_swap=self.evaluation.tta_swap).float()
        if self.evaluation.calibrated:
            logits = logits / self.evaluation.temperature
        return {"index": valid_rows(batch, batch["index"]), "logits": valid_rows(batch, logits)}

    # ---- optimisation -------------------------------------------------------------------------
    def backbone_depths(self) -> dict[str, int]:
        """Depth of each backbone parameter: 0 embeddings, i+1 for layer i, top for the rest (optim.py)."""
        return backbone_depths(self.backbone)

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self.backbone, self.fresh_parameters(), hp.lr, hp.head_lr, hp.weight_decay, hp.layer_lr_decay)
        return optimizer_and_schedule(groups, hp.lr, self.trainer.estimated_stepping_batches, hp.warmup_ratio,
                                      hp.schedule, hp.min_lr_ratio)

    # ---- FSDP (trainer=fsdp) ------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy (`trainer=fsdp`): shard with FSDP2 (model/sharding.py);
        nothing under any other strategy."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from pref_lightning.model.sharding import configure_sharding

            configure_sharding(self, self.trainer)

    # ---- self-contained checkpoints -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = payload(self.backbone.config.to_dict(), self.tokenizer_files, self.temperature)
        if self.base_model is not None:  # adapter and head only; the base is named, not stored
            checkpoint["state_dict"] = without_base_weights(checkpoint["state_dict"])
            checkpoint[CHECKPOINT_KEY]["base_model"] = dict(self.base_model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming or validating a LoRA checkpoint: the base weights come from the loaded base model,
        which must be the one the checkpoint names (UserError otherwise)."""
        stored = checkpoint.get(CHECKPOINT_KEY, {}).get("base_model")
        if stored and self.base_model is not None:
            check_base(stored, self.base_model["folder"])
            if "state_dict" in checkpoint:  # trainer=fsdp: the strategy has loaded (and removed) it already
                checkpoint["state_dict"] = with_base_weights(checkpoint["state_dict"], self)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu", compile: bool = False,
                        backbone: str | None = None) -> tuple[PreferenceModule, Any, EncodingSpec]:
        """Rebuild (module, tokenizer, encoding spec) from one checkpoint file, offline.

        `compile` replaces the training run's setting: compiling pays off for long prediction jobs only.
        A checkpoint without base weights (LoRA, or a merged export) loads them from `backbone` (a folder;
        default: the one it names): MissingFileError when absent, UserError when it is another model.
        Raises `UserError` naming the file when it is not a pref-lightning checkpoint of a readable format.
        """
        checkpoint = load_checkpoint(path, map_location)
        stored = checkpoint[CHECKPOINT_KEY]
        hparams = {**checkpoint["hyper_parameters"], "compile": compile}
        if stored.get("base_model"):
            module = cls(**{**hparams, "backbone": check_base(stored["base_model"], backbone)},
                         tokenizer_files=stored["tokenizer_files"])
            module.load_state_dict(with_base_weights(checkpoint["state_dict"], module))
        else:
            module = cls(**hparams, backbone_config=stored["backbone_config"], tokenizer_files=stored["tokenizer_files"])
            module.load_state_dict(without_unused_weights(checkpoint["state_dict"], module))
        module.set_evaluation(temperature=float(stored.get("temperature", 1.0)))
        return module, tokenizer_from_files(stored["tokenizer_files"]), module.spec
