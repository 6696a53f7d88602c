"""The network: backbone + head (+ anchored regression, reward head, frozen text scorer) and the forward
math from token ids to (n, K) logits, as a plain `nn.Module`. `PreferenceModule` (module.py) is this class
plus the training loop, so every parameter keeps its name (`backbone.*`, `head.*`, `anchor.*`,
`reward_head.*`, `text_scorer.*`) and checkpoints written before the split load unchanged.

`PreferenceNetwork` is a little over 300 lines: 40 of them are its signature (35 plain arguments, the names
a checkpoint's hyperparameters use), and its encoding paths (padded, grouped, packed; siamese, cross) share
the state the constructor sets up."""

from __future__ import annotations

import inspect
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import PROB_FLOOR, SWAP, class_probabilities
from pref_lightning.data.collate import side_groups as group_sides
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.tokenizers import tokenizer_from_files
from pref_lightning.model.anchor import AnchorOffset
from pref_lightning.model.backbone import build_backbone, load_tokenizer, reward_score_weight
from pref_lightning.model.evaluation import EvaluationPolicy
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
from pref_lightning.model.lora import apply_lora, base_identity, lora_settings, quantization_config
from pref_lightning.model.stages import text_side_columns

log = logging.getLogger(__name__)
PACKED_MODES = ("auto", "true", "false")
# decoder families whose transformers models read packed sequences (one row, positions restarting at 0 per
# sequence: a block-diagonal causal mask, or flash-attention's variable-length kernel)
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def prepare_backbone(model: nn.Module, lora_config: Mapping[str, Any] | None, backbone: str, verdict: bool,
                     gradient_checkpointing: bool, freeze_embeddings: bool) -> tuple[nn.Module, dict[str, str] | None]:
    """The built backbone `model` made ready to train, and the base's identity with LoRA (None without).
    LoRA: the base stays frozen and out of checkpoints, which store its identity instead (lora.py); verdict
    tokens: the LM head stays as pretrained (with LoRA: unless target_modules names it)."""
    base_model = None
    if lora_config is not None:
        model = apply_lora(model, lora_config, gradient_checkpointing)
        base_model = base_identity(backbone)
    elif verdict:
        model.get_output_embeddings().requires_grad_(False)
    model.train()  # from_pretrained returns eval mode (dropout off, Lightning's warning)
    if gradient_checkpointing:
        # transformers 5 renamed it; the old name is deprecated
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model, base_model


def frozen_reward_head(backbone: str, backbone_config: Mapping[str, Any] | None, hidden: int,
                       layout: str) -> nn.Linear:
    """`model.reward_score`: the reward model's own score head (hidden -> 1, frozen), read at each answer's
    last real token as the reward model reads it. From a checkpoint (`backbone_config` set) the state dict
    fills it. UserError unless a siamese layout over a real (not `tiny`) backbone."""
    if layout != "siamese":
        raise UserError("model.reward_score=true scores each answer on its own: it needs data.layout=siamese")
    if backbone == "tiny":
        raise UserError("model.reward_score=true needs a reward model: model.backbone=/path/to/reward-model")
    head = nn.Linear(hidden, 1, bias=False)
    weight = reward_score_weight(backbone) if backbone_config is None else torch.zeros(1, hidden)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head.requires_grad_(False)


def verdict_ids(backbone: str, tokens: Sequence[str], files: Mapping[str, bytes] | None, n_classes: int) -> list[int]:
    """Token ids of `model.verdict_tokens` in the run's tokenizer (its files, else the backbone's own)."""
    with tempfile.TemporaryDirectory(prefix="pref_tokenizer_") as folder:
        tokenizer = tokenizer_from_files(files, folder) if files else load_tokenizer(backbone)
        return verdict_token_ids(tokenizer, tokens, n_classes)


class PreferenceNetwork(nn.Module):
    """Siamese (or cross) preference network: shared backbone encodes both sides, the head turns them into
    K logits (A wins, B wins[, tie]). Every argument is a plain value (a checkpoint's hyperparameters);
    the evaluation policy (`tta_swap`, `prob_floor`, `anchor_blend`, the temperature) changes only through
    `set_evaluation`."""

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
        gradient_checkpointing: bool = False,
        use_text_stats: bool = True,
        symmetric_head: bool | str = False,
        tta_swap: bool = True,
        freeze_embeddings: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        backbone_config: Mapping[str, Any] | None = None,
        prob_floor: float = PROB_FLOOR,
        anchor_head: bool = False,
        anchor_trainable: bool = False,
        anchor: Mapping[str, Any] | None = None,
        spec: EncodingSpec | Mapping[str, Any] | None = None,
        tokenizer_files: Mapping[str, bytes] | None = None,
        lora: Mapping[str, Any] | None = None,
        attn_implementation: str | None = None,
        backbone_dtype: str | None = None,
        side_groups: int = 4,
        reward_score: bool = False,
        packed: bool | str = "auto",
        text_anchor: Mapping[str, Any] | None = None,
        anchor_blend: float = 1.0,
        head: str = "mlp",
        verdict_tokens: Sequence[str] = VERDICT_TOKENS,
        attn_softcapping: bool | None = None,
        interaction: str = "none",
        source_heads: bool = False,
    ) -> None:
        super().__init__()
        if str(packed).lower() not in PACKED_MODES:
            raise UserError(f"model.packed={packed!r}; choose auto, true or false")
        if int(side_groups) < 1:
            raise UserError(f"model.side_groups={side_groups} must be >= 1 (1: one (2B, L) backbone call)")
        # the data side's contract (layout, classes, statistics...): every checkpoint carries it and
        # prediction encodes rows exactly as training did
        self.spec = spec if isinstance(spec, EncodingSpec) else EncodingSpec.from_dict(spec or {}, where="model spec")
        n_classes, layout = self.spec.n_classes, self.spec.layout
        self.evaluation = EvaluationPolicy(tta_swap=tta_swap, prob_floor=prob_floor,
                                           anchor_blend=anchor_blend).checked(n_classes)
        self.pooling, self.side_groups = pooling, int(side_groups)
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
            interaction = "none"
        check_interaction(interaction, layout, head)  # model.interaction (head.py): opt-in, off by default
        self.interaction = interaction
        self.verdict = head == "verdict_tokens"
        self.backbone = build_backbone(backbone, vocab_size=vocab_size, tiny_overrides=tiny_config,
                                       config_dict=backbone_config, dropout=backbone_dropout,
                                       attn_implementation=attn_implementation, dtype=backbone_dtype,
                                       quantization=quantization_config(lora_config), causal_lm=self.verdict,
                                       attn_softcapping=attn_softcapping)
        self.backbone, self.base_model = prepare_backbone(self.backbone, lora_config, backbone, self.verdict,
                                                          gradient_checkpointing, freeze_embeddings)
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
        self.reward_head = frozen_reward_head(backbone, backbone_config, hidden, layout) if reward_score else None
        stats_size += int(reward_score)
        # a frozen earlier stage (model.text_anchor, stages.py) scores each pair from the text alone; its
        # per-side score is one more column for the head and for the anchored head's regression
        self.text_scorer: PreferenceNetwork | None = None
        if text_anchor is not None:
            if layout != "siamese":
                raise UserError("model.text_anchor scores one side at a time: it needs data.layout=siamese")
            self.text_scorer = PreferenceNetwork.from_hparams(text_anchor["hparams"], text_anchor["backbone_config"])
            self.text_scorer.requires_grad_(False).eval()
            stats_size += 1
        # model.source_heads: one output layer per training source (spec.n_sources, the data's fact) over the
        # shared encoder and trunk; source 0's (the training file's) is the head every evaluation reads
        n_heads = self.spec.n_sources if source_heads else 1
        if n_heads > 1 and self.verdict:
            raise UserError("model.source_heads=true adds an output layer per source to an MLP head; "
                            "model.head=verdict_tokens reads the LM head's own logits: use one or the other")
        self.n_heads = n_heads
        if self.verdict:
            self.head = VerdictHead(verdict_ids(backbone, verdict_tokens, tokenizer_files, n_classes),
                                    stats_size, n_classes)
        elif layout == "cross":
            self.head = CrossHead(pooled_size(hidden, pooling), head_hidden, head_dropout, stats_size,
                                  n_classes=n_classes, n_sources=n_heads)
        elif layout == "siamese":
            self.head = PairHead(pooled_size(hidden, pooling) + interaction_size(hidden, interaction), combine,
                                 head_hidden, head_dropout,
                                 n_classes=n_classes, stats_size=stats_size, symmetric=symmetric_head,
                                 n_sources=n_heads)
        else:  # EncodingSpec admits no other layout
            raise AssertionError(layout)
        # anchored head: the statistics' logistic regression as an offset, the head's last layer at zero
        self.anchor = None
        self.fitted_anchor = dict(anchor) if anchor is not None else None
        if anchor_head:
            if not use_text_stats:
                raise UserError("model.anchor_head=true needs model.use_text_stats=true (it regresses on them)")
            if anchor is None:
                raise UserError("model.anchor_head=true needs the fitted anchor (model.anchor.fit_anchor_on(datamodule))")
            self.anchor = AnchorOffset(dict(anchor), trainable=anchor_trainable)
            self.reset_to_baseline()
        self.last_processed_tokens = 0  # token positions the backbone ran over in the last forward pass
        self.last_real_tokens: torch.Tensor | int = 0  # real (unmasked) tokens among them

    def fresh_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the backbone that train at `model.head_lr`: the head and the anchor's offset
        (a frozen text scorer is not among them)."""
        parts = [self.head, self.anchor]
        return [p for part in parts if part is not None for p in part.parameters()]

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], backbone_config: Mapping[str, Any] | None) -> PreferenceNetwork:
        """The network of a checkpoint's hyperparameters (those of the whole module: the training settings
        among them are left out) and its backbone's config."""
        names = inspect.signature(PreferenceNetwork.__init__).parameters
        return PreferenceNetwork(**{k: v for k, v in hparams.items() if k in names and k != "backbone_config"},
                                 backbone_config=backbone_config)

    def train(self, mode: bool = True) -> PreferenceNetwork:
        super().train(mode)
        if self.text_scorer is not None:  # frozen: no dropout, whatever the loop asks
            self.text_scorer.eval()
        return self

    # ---- evaluation policy --------------------------------------------------------------------
    def set_evaluation(self, *, tta_swap: bool | None = None, temperature: float | None = None,
                       calibrated: bool | None = None, prob_floor: float | None = None,
                       anchor_blend: float | None = None) -> EvaluationPolicy:
        """Change how validation, calibration and prediction read the logits (None: keep); returns the
        policy now in force. Raises `UserError` for a value outside its range (evaluation.py)."""
        self.evaluation = self.evaluation.replace(self.spec.n_classes, tta_swap=tta_swap, temperature=temperature,
                                                  calibrated=calibrated, prob_floor=prob_floor,
                                                  anchor_blend=anchor_blend)
        return self.evaluation

    @property
    def temperature(self) -> float:
        """The calibration temperature (1.0 until `set_evaluation(temperature=...)`)."""
        return self.evaluation.temperature

    def probabilities(self, logits: torch.Tensor, calibrated: bool = False) -> torch.Tensor:
        """(n, K) class probabilities of (n, K) logits as validation, calibration and prediction report them:
        softmax (of logits / temperature when `calibrated`), floored at `prob_floor` (metrics.mix_floor)."""
        temperature = self.evaluation.temperature if calibrated else 1.0
        return class_probabilities(logits, temperature, self.evaluation.prob_floor)

    @torch.no_grad()
    def reset_to_baseline(self) -> None:
        """The anchored model at step 0: the head's output layers at zero and the anchor at its fitted
        regression (it may have moved with `anchor_trainable`), so the logits are the regression's alone."""
        for layer in output_layers(self.head):
            layer.weight.zero_()
            layer.bias.zero_()
        self.anchor.reset(dict(self.fitted_anchor))

    # ---- encoding -----------------------------------------------------------------------------
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
        if self.reward_head is None:
            return pooled
        # the reward model's score of each row's last real token: one more column (split off in side_vectors)
        score = self.reward_head(last_hidden().float())
        return torch.cat([pooled, score.to(pooled.dtype)], -1)

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
        if self.interaction != "none":  # model.interaction reads padded rows
            raise UserError("model.interaction needs padded batches: set model.packed=false")
        hidden = self.body()(input_ids=input_ids[mask].unsqueeze(0), position_ids=positions).last_hidden_state[0]
        self.last_processed_tokens = int(positions.shape[1])
        self.last_real_tokens = lengths.sum()
        return self._read_out(pool_packed(hidden, lengths, self.pooling),
                              lambda: hidden[torch.cumsum(lengths, 0) - 1])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, pooled) vectors of `input_ids` / `attention_mask` (n, L), in one backbone call (packed
        without padding when `uses_packed`)."""
        if self.uses_packed(input_ids.device):
            return self.encode_packed(input_ids, attention_mask)
        hidden = self.body()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.last_processed_tokens = attention_mask.numel()
        self.last_real_tokens = attention_mask.sum()  # a tensor: read (one host sync) only by who needs it
        pooled = pool(hidden, attention_mask, self.pooling)
        if self.interaction != "none":  # model.interaction: prompt-answer match per side
            states = self.interaction_states(hidden, input_ids)
            pooled = torch.cat([pooled, prompt_answer_interaction(states, input_ids, attention_mask)], -1)
        return self._read_out(pooled, lambda: last_token_pool(hidden, attention_mask))

    def interaction_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """What `model.interaction` compares (n, L, hidden): the last hidden states, or (`*_embeddings`) the
        backbone's input token embeddings, where attention has not yet mixed the prompt and the answer."""
        if self.interaction.endswith("_embeddings"):
            return self.backbone.get_input_embeddings()(input_ids).to(hidden.dtype)
        return hidden

    def encode_grouped(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`encode` of right-padded rows (n, L), run as up to `side_groups` backbone calls over rows of
        similar length (`collate.side_groups`), each cut to its own longest row, so that a short side is not
        padded to the longest one of the batch; (n, pooled) vectors back in row order. Padding positions
        are masked, so the result equals one call over (n, L) up to float rounding; every pooling
        (`last` included) reads each row's own mask. `last_processed_tokens`: what the calls really ran."""
        if self.side_groups <= 1 or input_ids.shape[0] <= 1 or self.uses_packed(input_ids.device):
            return self.encode(input_ids, attention_mask)
        lengths = attention_mask.sum(1).tolist()  # one host sync per step
        parts, rows, processed = [], [], 0
        for group in group_sides(lengths, self.side_groups):
            width = max(1, max(int(lengths[i]) for i in group))
            index = torch.tensor(group, device=input_ids.device)
            parts.append(self.encode(input_ids[index, :width], attention_mask[index, :width]))
            rows.append(index)
            processed += len(group) * width
        self.last_processed_tokens = processed
        self.last_real_tokens = attention_mask.sum()
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]

    # ---- logits -------------------------------------------------------------------------------
    @property
    def is_cross(self) -> bool:
        return self.spec.layout == "cross"

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    def head_logits(self, *inputs: torch.Tensor | None, source: torch.Tensor | None = None) -> torch.Tensor:
        """The head's logits of `inputs`; `source` (n,) long picks each row's output layer with
        `model.source_heads` (None, or a one-head model: source 0's, the training file's)."""
        if self.n_heads > 1 and source is not None:
            return self.head(*inputs, source=source)
        return self.head(*inputs)

    def cross_logits(self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor,
                     source: torch.Tensor | None = None) -> torch.Tensor:
        """(len(rows), K) logits of cross-layout rows: `batch` holds (2B, L) rows, row i < B showing pair i
        as (A, B) and row B + i as (B, A); the logits of an exchanged row are in its own order's classes
        (its "A wins" means B wins). Statistics follow the same order: (2B, F), side A's then side B's.
        `source` (B,) long: each pair's source (training with `model.source_heads`; None: source 0)."""
        pooled = self.encode_grouped(batch["input_ids"][rows], batch["attention_mask"][rows]).float()
        if source is not None:
            source = source.to(rows.device)[rows % len(source)]
        stats = batch.get("stats")
        if stats is None:
            return self.anchored(self.head_logits(pooled, source=source), None, None)
        stats = stats.float()
        first, second = stats[rows], stats[(rows + len(stats) // 2) % len(stats)]
        return self.anchored(self.head_logits(pooled, first, second, source=source), first, second)

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor, stats_a: torch.Tensor | None,
                    stats_b: torch.Tensor | None, source: torch.Tensor | None = None) -> torch.Tensor:
        """(n, K) logits of side vectors (n, hidden) and statistics (n, n_stats): head, plus the anchor.
        `source` (n,) long: each row's training source, whose output layer scores it (`model.source_heads`;
        None: source 0's, what validation and prediction read). The anchor is the same for every source."""
        return self.anchored(self.head_logits(a, b, stats_a, stats_b, source=source), stats_a, stats_b)

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
        w = self.evaluation.anchor_blend
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
