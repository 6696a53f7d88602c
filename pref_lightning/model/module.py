"""LightningModule: shared backbone encodes both sides, `PairHead` turns them into 3 logits."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pref_lightning.core.errors import UserError
from pref_lightning.core.losses import batch_loss
from pref_lightning.core.metrics import (
    PROB_FLOOR,
    SWAP,
    LogLoss,
    PaddingEfficiency,
    check_floor,
    class_probabilities,
)
from pref_lightning.data.collate import side_groups as group_sides
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.tokenizers import tokenizer_from_files
from pref_lightning.model.anchor import AnchorOffset
from pref_lightning.model.backbone import build_backbone, load_tokenizer, reward_score_weight
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, load_checkpoint, payload, without_unused_weights
from pref_lightning.model.head import (
    VERDICT_TOKENS,
    CrossHead,
    PairHead,
    VerdictHead,
    check_head,
    check_interaction,
    interaction_size,
    last_token_pool,
    output_layers,
    pool,
    pool_packed,
    pooled_size,
    prompt_answer_interaction,
    verdict_token_ids,
)
from pref_lightning.model.lora import (
    apply_lora,
    base_identity,
    check_base,
    lora_settings,
    quantization_config,
    trainable_summary,
    with_base_weights,
    without_base_weights,
)
from pref_lightning.model.stages import text_side_columns

log = logging.getLogger(__name__)
SWAP_MODES = ("none", "random", "full")
PACKED_MODES = ("auto", "true", "false")
# decoder families whose transformers models read packed sequences (one row, positions restarting at 0 per
# sequence: a block-diagonal causal mask, or flash-attention's variable-length kernel)
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


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


def valid_rows(batch: Mapping[str, torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """`values` (one per row of `batch`) without the DDP padding rows (`batch["valid"]` False)."""
    valid = batch.get("valid")
    return values if valid is None else values[valid.to(values.device)]


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
        use_text_stats: bool = True,
        symmetric_head: bool = False,
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
    ) -> None:
        super().__init__()
        if str(packed).lower() not in PACKED_MODES:
            raise UserError(f"model.packed={packed!r}; choose auto, true or false")
        if int(side_groups) < 1:
            raise UserError(f"model.side_groups={side_groups} must be >= 1 (1: one (2B, L) backbone call)")
        if swap_augment not in SWAP_MODES:
            raise UserError(f"model.swap_augment={swap_augment!r}; choose from {', '.join(SWAP_MODES)}")
        # the data side's contract (layout, classes, statistics...): a plain dict in hparams, so every
        # checkpoint carries it and prediction encodes rows exactly as training did
        self.spec = spec if isinstance(spec, EncodingSpec) else EncodingSpec.from_dict(spec or {}, where="model spec")
        n_classes, layout = self.spec.n_classes, self.spec.layout
        check_floor(prob_floor, n_classes)
        if not 0.0 <= anchor_blend <= 1.0:
            raise UserError(f"model.anchor_blend={anchor_blend} must lie in [0, 1] (1: the trained model alone)")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing={label_smoothing} must lie in [0, 1)")
        # train_prior: class frequencies of the training split (PriorGuard); reference: reference log
        # losses on the validation rows (logged beside val/log_loss)
        self.train_prior = [float(p) for p in (train_prior or [])]
        self.reference = {str(k): float(v) for k, v in (reference or {}).items()}
        # save_hyperparameters reads these locals: plain values only. The tokenizer's files travel in the
        # checkpoint payload instead (loggers write hyperparameters as YAML).
        spec, train_prior, reference = self.spec.to_dict(), self.train_prior, self.reference
        self.save_hyperparameters(ignore=["backbone_config", "tokenizer_files"])
        self.tokenizer_files = dict(tokenizer_files or {})
        self.swap_index = SWAP[:n_classes]
        lora_config = lora_settings(lora)
        if lora_config is not None and (backbone == "tiny" or backbone_config is not None):
            raise UserError("model.lora needs a pretrained backbone: model.backbone=/path/to/model or a hub name")
        # model.head=verdict_tokens: the decoder is built with its LM head, whose verdict-token logits are the classes
        check_head(head, layout, self.spec.template, pooling, backbone, anchor_head)
        if interaction != "none" and layout == "cross":  # model.interaction: siamese sides only (the embedded
            log.warning("model.interaction=%s reads a siamese side's prompt and answer: off in data.layout=cross",
                        interaction)  # default's recipe switches it on; a cross run keeps working without it)
            self.hparams.interaction = interaction = "none"
        check_interaction(interaction, layout, head)  # model.interaction (head.py): opt-in, off by default
        self.verdict = head == "verdict_tokens"
        self.backbone = build_backbone(backbone, vocab_size=vocab_size, tiny_overrides=tiny_config,
                                       config_dict=backbone_config, dropout=backbone_dropout,
                                       attn_implementation=attn_implementation, dtype=backbone_dtype,
                                       quantization=quantization_config(lora_config), causal_lm=self.verdict,
                                       attn_softcapping=attn_softcapping)
        # LoRA: the base stays frozen and out of checkpoints, which store its identity instead (lora.py)
        self.base_model: dict[str, str] | None = None
        if lora_config is not None:
            self.backbone = apply_lora(self.backbone, lora_config, gradient_checkpointing)
            self.base_model = base_identity(backbone)
        elif self.verdict:  # the LM head stays as pretrained (with LoRA: unless target_modules names it)
            self.backbone.get_output_embeddings().requires_grad_(False)
        self.backbone.train()  # from_pretrained returns eval mode (dropout off, Lightning's warning)
        if gradient_checkpointing:
            # transformers 5 renamed it; the old name is deprecated
            enable = getattr(self.backbone, "activation_checkpointing_enable", None) \
                or self.backbone.gradient_checkpointing_enable
            enable()
        if freeze_embeddings:
            self.backbone.get_input_embeddings().weight.requires_grad_(False)
        if compile:
            # in place (nn.Module.compile), so parameter names and checkpoints stay those of the
            # plain module; dynamic shapes because length-grouped batches vary in length
            self.body().compile(backend=compile_backend, dynamic=True)
        hidden = self.backbone.config.hidden_size
        self.packed_mode = str(packed).lower()
        if self.packed_mode == "true" and not self.packable:
            raise UserError(f"model.packed=true needs a decoder LLM backbone ({', '.join(PACKABLE_MODEL_TYPES)}); "
                            f"this one is {self.backbone.config.model_type!r}")
        self._packed_path: bool | None = None  # decided (and logged) at the first forward pass
        stats_size = self.spec.n_stats if use_text_stats else 0
        # a reward model's own score of each answer, beside the side statistics (frozen: its head, read
        # at the last real token as the reward model reads it)
        self.reward_head: nn.Linear | None = None
        if reward_score:
            if layout != "siamese":
                raise UserError("model.reward_score=true scores each answer on its own: it needs data.layout=siamese")
            if backbone == "tiny":
                raise UserError("model.reward_score=true needs a reward model: model.backbone=/path/to/reward-model")
            self.reward_head = nn.Linear(hidden, 1, bias=False)
            # from a checkpoint (backbone_config set) the state dict fills it
            weight = reward_score_weight(backbone) if backbone_config is None else torch.zeros(1, hidden)
            with torch.no_grad():
                self.reward_head.weight.copy_(weight)
            self.reward_head.requires_grad_(False)
            stats_size += 1
        # a frozen earlier stage (model.text_anchor, stages.py) scores each pair from the text alone; its
        # per-side score is one more column for the head and for the anchored head's regression
        self.text_scorer: PreferenceModule | None = None
        if text_anchor is not None:
            if layout != "siamese":
                raise UserError("model.text_anchor scores one side at a time: it needs data.layout=siamese")
            self.text_scorer = PreferenceModule(**text_anchor["hparams"], backbone_config=text_anchor["backbone_config"])
            self.text_scorer.requires_grad_(False).eval()
            stats_size += 1
        if self.verdict:
            self.head = VerdictHead(self._verdict_ids(backbone, verdict_tokens, tokenizer_files, n_classes),
                                    stats_size, n_classes)
        elif layout == "cross":
            self.head = CrossHead(pooled_size(hidden, pooling), head_hidden, head_dropout, stats_size,
                                  n_classes=n_classes)
        elif layout == "siamese":
            self.head = PairHead(pooled_size(hidden, pooling) + interaction_size(hidden, interaction), combine,
                                 head_hidden, head_dropout,
                                 n_classes=n_classes, stats_size=stats_size, symmetric=symmetric_head)
        else:  # EncodingSpec admits no other layout
            raise AssertionError(layout)
        # anchored head: the statistics' logistic regression as an offset, the head's last layer at zero
        self.anchor = None
        if anchor_head:
            if not use_text_stats:
                raise UserError("model.anchor_head=true needs model.use_text_stats=true (it regresses on them)")
            if anchor is None:
                raise UserError("model.anchor_head=true needs the fitted anchor (model.anchor.fit_anchor_on(datamodule))")
            self.anchor = AnchorOffset(dict(anchor), trainable=anchor_trainable)
            self.reset_to_baseline()
        self.val_log_loss = LogLoss()
        self.val_accuracy = MulticlassAccuracy(num_classes=n_classes, average="micro")
        self.train_log_loss = LogLoss()
        # real / processed tokens of the epoch: a summed metric that Lightning syncs with the others
        self.train_padding = PaddingEfficiency()
        self.last_processed_tokens = 0  # token positions the backbone ran over in the last forward pass
        self.last_real_tokens: torch.Tensor | int = 0  # real (unmasked) tokens among them
        self.temperature: float = 1.0  # fitted on validation logits after training (calibration)
        self.apply_temperature = True

    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.text_scorer is not None:  # frozen: no dropout, whatever the loop asks
            self.text_scorer.eval()
        return self

    # ---- runtime ------------------------------------------------------------------------------
    def _flush_denormals(self) -> None:
        # Denormal floats in trained weights made CPU steps up to 6x slower; some lazily imported
        # libraries reset the flag, so it is set again at the start of every loop.
        torch.set_flush_denormal(True)

    def on_fit_start(self) -> None:
        self._flush_denormals()
        if self.base_model is not None and self.trainer.is_global_zero:
            print(f"[pref-lightning] {trainable_summary(self)}", flush=True)

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

    @torch.no_grad()
    def reset_to_baseline(self) -> None:
        """The anchored model at step 0: the head's output layers at zero and the anchor at its fitted
        regression (it may have moved with `anchor_trainable`), so the logits are the regression's alone."""
        for layer in output_layers(self.head):
            layer.weight.zero_()
            layer.bias.zero_()
        self.anchor.reset(dict(self.hparams.anchor))

    # ---- forward ------------------------------------------------------------------------------
    @staticmethod
    def _verdict_ids(backbone: str, tokens: Sequence[str], files: Mapping[str, bytes] | None,
                     n_classes: int) -> list[int]:
        """Token ids of `model.verdict_tokens` in the run's tokenizer (its files, else the backbone's own)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pref_tokenizer_") as folder:
            tokenizer = tokenizer_from_files(files, folder) if files else load_tokenizer(backbone)
            return verdict_token_ids(tokenizer, tokens, n_classes)

    def body(self) -> nn.Module:
        """The network the encoder calls for last hidden states: the backbone, or with verdict tokens the
        decoder inside the causal LM (its LM head then reads the last real token of each row only)."""
        return self.backbone.get_decoder() if self.verdict else self.backbone

    def _read_out(self, pooled: torch.Tensor, last_hidden) -> torch.Tensor:
        """What `encode` returns: the verdict tokens' logits (n, K) read from the last real token's state
        (`last_hidden()`, (n, hidden)) by the LM head, else `pooled` (with the reward column when asked)."""
        if self.verdict:
            softcap = getattr(self.backbone.config, "final_logit_softcapping", None)
            return self.head.read(last_hidden(), self.backbone.get_output_embeddings(), softcap)
        return self._with_reward(pooled, last_hidden)

    @property
    def packable(self) -> bool:
        return getattr(self.backbone.config, "model_type", None) in PACKABLE_MODEL_TYPES

    def uses_packed(self, device: torch.device) -> bool:
        """Padding-free batches? `model.packed=true`: yes (a packable decoder); `auto`: with flash-attention
        on a CUDA GPU, where packing saves the padded tokens' compute (elsewhere the packed mask is dense,
        T x T for T packed tokens, and the padded path is cheaper); `false`: never. Logged once."""
        if self._packed_path is None:
            implementation = getattr(self.backbone.config, "_attn_implementation", None)
            auto = self.packable and implementation == "flash_attention_2" and device.type == "cuda"
            self._packed_path = self.packed_mode == "true" or (self.packed_mode == "auto" and auto)
            if self.packable:  # encoders never pack: nothing to say
                log.info("padding-free packed batches: %s (model.packed=%s, %s, attention %s, %s)",
                         "on" if self._packed_path else "off, padded batches", self.packed_mode,
                         getattr(self.backbone.config, "model_type", "?"), implementation, device.type)
        return self._packed_path

    def encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`encode` with the rows' real tokens packed end to end into one (1, T) row, positions restarting
        at 0 for each (transformers then keeps the sequences apart: a block-diagonal causal mask, or
        flash-attention's variable-length kernel): no padded token is computed. Right or left padding."""
        mask = attention_mask.bool()
        lengths = attention_mask.sum(1)
        positions = (torch.cumsum(attention_mask, 1) - 1)[mask].unsqueeze(0)
        if self.hparams.get("interaction", "none") != "none":  # model.interaction reads padded rows
            raise UserError("model.interaction needs padded batches: set model.packed=false")
        hidden = self.body()(input_ids=input_ids[mask].unsqueeze(0), position_ids=positions).last_hidden_state[0]
        self.last_processed_tokens = int(positions.shape[1])
        self.last_real_tokens = lengths.sum()
        return self._read_out(pool_packed(hidden, lengths, self.hparams.pooling),
                              lambda: hidden[torch.cumsum(lengths, 0) - 1])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, pooled) vectors of `input_ids` / `attention_mask` (n, L), in one backbone call (packed
        without padding when `uses_packed`)."""
        if self.uses_packed(input_ids.device):
            return self.encode_packed(input_ids, attention_mask)
        hidden = self.body()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.last_processed_tokens = attention_mask.numel()
        self.last_real_tokens = attention_mask.sum()  # a tensor: read (one host sync) only by who needs it
        pooled = pool(hidden, attention_mask, self.hparams.pooling)
        if self.hparams.get("interaction", "none") != "none":  # model.interaction: prompt-answer match per side
            states = self.interaction_states(hidden, input_ids)
            pooled = torch.cat([pooled, prompt_answer_interaction(states, input_ids, attention_mask)], -1)
        return self._read_out(pooled, lambda: last_token_pool(hidden, attention_mask))

    def interaction_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """What `model.interaction` compares (n, L, hidden): the last hidden states, or (`*_embeddings`) the
        backbone's input token embeddings, where attention has not yet mixed the prompt and the answer."""
        if self.hparams.interaction.endswith("_embeddings"):
            return self.backbone.get_input_embeddings()(input_ids).to(hidden.dtype)
        return hidden

    def _with_reward(self, pooled: torch.Tensor, last_hidden) -> torch.Tensor:
        """`pooled` (n, pooled), with the reward model's score of each row's last real token (`last_hidden()`,
        (n, hidden)) as one more column when `model.reward_score` (split off again in `side_vectors`)."""
        if self.reward_head is None:
            return pooled
        score = self.reward_head(last_hidden().float())
        return torch.cat([pooled, score.to(pooled.dtype)], -1)

    def encode_grouped(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`encode` of right-padded rows (n, L), run as up to `side_groups` backbone calls over rows of
        similar length (`collate.side_groups`), each cut to its own longest row, so that a short side is not
        padded to the longest one of the batch; (n, pooled) vectors back in row order. Padding positions
        are masked, so the result equals one call over (n, L) up to float rounding; every pooling
        (`last` included) reads each row's own mask. `last_processed_tokens`: what the calls really ran."""
        groups = int(getattr(self.hparams, "side_groups", 1))
        if groups <= 1 or input_ids.shape[0] <= 1 or self.uses_packed(input_ids.device):
            return self.encode(input_ids, attention_mask)
        lengths = attention_mask.sum(1).tolist()  # one host sync per step
        parts, rows, processed = [], [], 0
        for group in group_sides(lengths, groups):
            width = max(1, max(int(lengths[i]) for i in group))
            index = torch.tensor(group, device=input_ids.device)
            parts.append(self.encode(input_ids[index, :width], attention_mask[index, :width]))
            rows.append(index)
            processed += len(group) * width
        self.last_processed_tokens = processed
        self.last_real_tokens = attention_mask.sum()
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]

    @property
    def is_cross(self) -> bool:
        return self.spec.layout == "cross"

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    def cross_logits(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), K) logits of cross-layout rows: `batch` holds (2B, L) rows, row i < B showing pair i
        as (A, B) and row B + i as (B, A); the logits of an exchanged row are in its own order's classes
        (its "A wins" means B wins). Statistics follow the same order: (2B, F), side A's then side B's."""
        pooled = self.encode_grouped(batch["input_ids"][rows], batch["attention_mask"][rows]).float()
        stats = batch.get("stats")
        if stats is None:
            return self.anchored(self.head(pooled), None, None)
        stats = stats.float()
        first, second = stats[rows], stats[(rows + len(stats) // 2) % len(stats)]
        return self.anchored(self.head(pooled, first, second), first, second)

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor, stats_a: torch.Tensor | None,
                    stats_b: torch.Tensor | None) -> torch.Tensor:
        """(n, K) logits of side vectors (n, hidden) and statistics (n, n_stats): head, plus the anchor."""
        return self.anchored(self.head(a, b, stats_a, stats_b), stats_a, stats_b)

    def anchored(self, logits: torch.Tensor, stats_a: torch.Tensor | None, stats_b: torch.Tensor | None) -> torch.Tensor:
        """`logits` plus the anchor's offset (anchored head), else unchanged."""
        if self.anchor is None:
            return logits
        k = self.spec.n_stats  # the anchor regresses on the side statistics (not the reward) and the text score
        if self.text_scorer is not None:
            offset = self.anchor(torch.cat([stats_a[..., :k], stats_a[..., -1:]], -1),
                                 torch.cat([stats_b[..., :k], stats_b[..., -1:]], -1))
        else:
            offset = self.anchor(stats_a[..., :k], stats_b[..., :k])
        return self.blend(logits + offset, offset)

    def blend(self, full: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Evaluation logits of the anchored model with `model.anchor_blend` w < 1: log(w softmax(full) +
        (1 - w) softmax(offset)), whose softmax is that mixture of the trained model and its step-0 baseline
        (an equal-weight ensemble for w = 0.5, a shrinkage towards the baseline). Training always uses the
        full logits, so the network learns the whole residual."""
        w = float(getattr(self.hparams, "anchor_blend", 1.0))
        if self.training or w >= 1.0:
            return full
        if w <= 0.0:
            return offset
        return torch.logaddexp(math.log(w) + F.log_softmax(full.float(), -1),
                               math.log1p(-w) + F.log_softmax(offset.float(), -1))

    @torch.no_grad()
    def text_scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K') swap-averaged logits of the frozen text scorer (`model.text_anchor`) for the batch's
        (2B, L) siamese sides, read from the tokens alone."""
        sides = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return self.text_scorer(sides, tta_swap=True).float()

    def side_vectors(self, batch: Mapping[str, torch.Tensor]):
        """Pooled vectors (B, pooled) and statistics (B, n_stats) of sides A and B from the batch's (2B, L)
        sides: one backbone call, or (`side_groups` > 1) calls over sides grouped by their own lengths."""
        pooled = self.encode_grouped(batch["input_ids"], batch["attention_mask"]).float()
        n = pooled.shape[0] // 2
        stats = batch.get("stats")
        if self.reward_head is not None:  # each side's reward: one more statistic for the head
            pooled, score = pooled[:, :-1], pooled[:, -1:]
            stats = score if stats is None else torch.cat([stats.float(), score], -1)
        if self.text_scorer is not None:  # each side's text score: the last column
            text_a, text_b = text_side_columns(self.text_scores(batch))
            text = torch.cat([text_a, text_b]).to(pooled.dtype)
            stats = text if stats is None else torch.cat([stats.float(), text], -1)
        stats_a, stats_b = (None, None) if stats is None else (stats[:n].float(), stats[n:].float())
        return pooled[:n], pooled[n:], stats_a, stats_b

    def forward(self, batch: Mapping[str, torch.Tensor], tta_swap: bool = False) -> torch.Tensor:
        """Logits (A wins, B wins, tie); `tta_swap` also scores B-vs-A and averages the two views."""
        if self.is_cross:
            n = len(batch["labels"])
            rows = torch.arange(2 * n if tta_swap else n, device=batch["input_ids"].device)
            logits = self.cross_logits(batch, rows)  # both orders in one call under TTA
            return 0.5 * (logits[:n] + logits[n:][:, self.swap_index]) if tta_swap else logits
        a, b, stats_a, stats_b = self.side_vectors(batch)
        logits = self.pair_logits(a, b, stats_a, stats_b)
        if tta_swap:
            logits = 0.5 * (logits + self.pair_logits(b, a, stats_b, stats_a)[:, self.swap_index])
        return logits

    def probabilities(self, logits: torch.Tensor, calibrated: bool = False) -> torch.Tensor:
        """(n, K) class probabilities of (n, K) logits as validation, calibration and prediction report them:
        softmax (of logits / temperature when `calibrated`), floored at `prob_floor` (metrics.mix_floor)."""
        temperature = self.temperature if calibrated else 1.0
        return class_probabilities(logits, temperature, self.hparams.prob_floor)

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
            flip = (torch.rand(len(labels), generator=self._augment_generator(batch_idx)) < 0.5).to(labels.device)
            col = flip.unsqueeze(1)
            a, b = torch.where(col, b, a), torch.where(col, a, b)
            if stats_a is not None:
                stats_a, stats_b = torch.where(col, stats_b, stats_a), torch.where(col, stats_a, stats_b)
            labels = torch.where(flip, swap[labels], labels)
            if targets is not None:
                targets = torch.where(col, targets[:, swap], targets)
        logits = self.pair_logits(a, b, stats_a, stats_b)
        loss = self._loss(logits, labels, batch, targets)
        if mode == "full":  # both orders in the same step
            swapped = None if targets is None else targets[:, swap]
            loss = 0.5 * (loss + self._loss(self.pair_logits(b, a, stats_b, stats_a), swap[labels], batch, swapped))
        return self._log_train(logits, labels, loss)

    def _cross_training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, labels: torch.Tensor,
                             targets: torch.Tensor | None, swap: torch.Tensor, mode: str) -> torch.Tensor:
        """Cross layout: `random` runs each pair in one order drawn by a coin (B rows), `full` in both (2B
        rows, mean of both losses), `none` as (A, B): the exchanged row is another sequence, its own pass."""
        n = len(labels)
        device = batch["input_ids"].device
        if mode == "random":
            flip = (torch.rand(n, generator=self._augment_generator(batch_idx)) < 0.5).to(device)
            rows = torch.arange(n, device=device) + n * flip.long()
            labels = torch.where(flip.to(labels.device), swap[labels], labels)
            if targets is not None:
                targets = torch.where(flip.unsqueeze(1).to(targets.device), targets[:, swap], targets)
        else:
            rows = torch.arange(2 * n if mode == "full" else n, device=device)
        logits = self.cross_logits(batch, rows)
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
        """Swap coins drawn from (seed, epoch, batch, rank), not from the global RNG: a run resumed
        mid-epoch flips exactly the coins the uninterrupted run would have flipped."""
        state = np.random.SeedSequence([self.hparams.augment_seed, self.current_epoch, batch_idx,
                                        self.global_rank]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state >> np.uint64(1)))

    def _log_train(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        if loss is None:
            loss = F.cross_entropy(logits, labels)
        self.train_log_loss(logits.detach().softmax(-1), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/log_loss", self.train_log_loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits of the batch's real rows: DDP padding rows (`valid` False) are scored, then dropped."""
        logits = valid_rows(batch, self(batch, tta_swap=self.hparams.tta_swap))
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
        logits = self(batch, tta_swap=self.hparams.tta_swap).float()
        if self.apply_temperature:
            logits = logits / self.temperature
        return {"index": valid_rows(batch, batch["index"]), "logits": valid_rows(batch, logits)}

    # ---- optimisation -------------------------------------------------------------------------
    def backbone_depths(self) -> dict[str, int]:
        """Depth of each backbone parameter: 0 embeddings, i+1 for layer i, top for the rest."""
        n_layers = int(getattr(self.backbone.config, "num_hidden_layers", 0))
        depths = {}
        for name, _ in self.backbone.named_parameters():
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

    def configure_optimizers(self):
        hp = self.hparams
        top = int(getattr(self.backbone.config, "num_hidden_layers", 0))
        depths = self.backbone_depths()
        buckets: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim < 2 or "LayerNorm" in name or "bias" in name
            buckets.setdefault((depths[name], no_decay), []).append(param)
        groups = [
            {"params": params, "lr": hp.lr * hp.layer_lr_decay ** (top - depth),
             "weight_decay": 0.0 if no_decay else hp.weight_decay,
             "name": f"backbone_d{depth}" + ("_no_decay" if no_decay else "")}
            for (depth, no_decay), params in sorted(buckets.items())
        ]
        head_params = [*self.head.parameters(), *(self.anchor.parameters() if self.anchor is not None else [])]
        groups.append({"params": [p for p in head_params if p.requires_grad], "lr": hp.head_lr,
                       "weight_decay": 0.0, "name": "head"})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_decay(step, warmup, total, hp.schedule, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        module.temperature = float(stored.get("temperature", 1.0))
        return module, tokenizer_from_files(stored["tokenizer_files"]), module.spec
