"""Settings checked against the backbone and the machine before any data is read.

A setting that contradicts the backbone otherwise fails late and cryptically: `data.max_length=1024` on
MiniLM (512 absolute positions) tokenizes the whole file, then crashes inside the embeddings with "The
expanded size of the tensor (1024) must match the existing size (512)"; a tokenizer with more tokens than
the embedding matrix has rows indexes out of range (a device-side assert on a GPU). Each check here raises
one `UserError` line naming the key, the value and the backbone's limit. Nothing is adjusted silently.
Trainer settings the machine cannot run (GPUs that are not there, float16 on a CPU) are refused or
adjusted the same way, in one line (`check_hardware`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, PretrainedConfig

from pref_lightning.core.cli import say
from pref_lightning.core.errors import UserError
from pref_lightning.core.runinfo import cpu_has_native_bf16
from pref_lightning.model.backbone import (
    TINY,
    TRUST_REMOTE_CODE,
    check_hub_backbone,
    load_tokenizer,
    resolve_backbone,
    softcapping_setting,
    tiny_config,
)
from pref_lightning.model.head import VERDICT_TOKENS, check_head, verdict_token_ids

# encoder families whose learned position table is indexed by absolute position (hard length limit)
ABSOLUTE_POSITION_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                                     "albert", "mpnet", "ernie", "xlm", "data2vec-text", "nomic_bert"})
# RoBERTa-style tables start after the padding index: positions padding_idx + 1 ... are usable
PADDING_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "data2vec-text"})


def backbone_config(backbone: str, tiny_overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The backbone's config (a local folder's config.json or a hub name; `tiny`: its DeBERTa config),
    without loading weights."""
    if backbone == TINY:
        return tiny_config(1, tiny_overrides)
    return AutoConfig.from_pretrained(resolve_backbone(backbone), trust_remote_code=TRUST_REMOTE_CODE)


def position_limit(config: PretrainedConfig) -> int | None:
    """Longest sequence (tokens, special tokens included) the backbone's position embeddings can index;
    None when positions are relative or rotary only (no hard limit)."""
    model_type = getattr(config, "model_type", "")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is None:
        return None
    if model_type in ("deberta-v2", "deberta"):
        # DeBERTa-v3 (position_biased_input=False) has relative positions only
        return int(max_positions) if getattr(config, "position_biased_input", True) else None
    if model_type in ABSOLUTE_POSITION_TYPES or getattr(config, "position_embedding_type", None) == "absolute":
        offset = int(getattr(config, "pad_token_id", 0) or 0) + 1 if model_type in PADDING_OFFSET_TYPES else 0
        return int(max_positions) - offset
    return None


def check_max_length(config: PretrainedConfig, max_length: int, key: str = "data.max_length",
                     backbone: str = "") -> None:
    """UserError when `max_length` tokens per sequence exceed what the backbone's positions index."""
    limit = position_limit(config)
    if limit is not None and int(max_length) > limit:
        name = backbone or getattr(config, "_name_or_path", "") or config.model_type
        raise UserError(f"{key}={max_length} exceeds the backbone's limit: {name} ({config.model_type}) has "
                         f"{limit} absolute positions (max_position_embeddings); set {key}={limit} or less")


def check_vocabulary(config: PretrainedConfig, tokenizer, key: str = "model.tokenizer", backbone: str = "") -> None:
    """UserError when the tokenizer can produce ids the backbone's embedding matrix has no row for."""
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > int(rows):
        name = backbone or config.model_type
        raise UserError(f"{key}: the tokenizer has {len(tokenizer)} tokens but the backbone {name} embeds only "
                         f"{rows} (vocab_size); use the tokenizer saved with that backbone")


def check_backbone_settings(cfg: DictConfig):
    """Refuse settings the backbone cannot serve (compat.py), reading no data. Returns the backbone's own
    tokenizer when it needs no training texts (else None: the tiny tokenizer is trained on the data)."""
    check_hub_backbone(cfg.model.backbone)  # a hub name offline: one line now, not retries and a traceback
    if cfg.model.get("tokenizer"):
        check_hub_backbone(cfg.model.tokenizer, key="model.tokenizer")
    config = backbone_config(cfg.model.backbone, cfg.model.get("tiny_config"))
    check_max_length(config, int(cfg.data.max_length), backbone=cfg.model.backbone)
    head = cfg.model.get("head", "mlp")
    check_head(head, cfg.data.get("layout", "siamese"), cfg.data.get("template", "plain"),
               cfg.model.get("pooling", "mean"), cfg.model.backbone, bool(cfg.model.get("anchor_head", False)))
    softcapping_setting(config, cfg.model.get("attn_softcapping"))
    if cfg.model.backbone == TINY and not cfg.model.get("tokenizer"):
        return None
    tokenizer = load_tokenizer(cfg.model.get("tokenizer") or cfg.model.backbone)
    if cfg.model.backbone != TINY:
        check_vocabulary(config, tokenizer, backbone=cfg.model.backbone)
    if head == "verdict_tokens":
        verdict_token_ids(tokenizer, cfg.model.get("verdict_tokens", VERDICT_TOKENS), int(cfg.data.get("n_classes", 3)))
    return tokenizer


GPU_ACCELERATORS = ("gpu", "cuda")
HALF_TRUE = ("16-true", "transformer-engine-float16")


def check_hardware(cfg: DictConfig) -> dict[str, Any]:
    """Refuse trainer settings this machine cannot run, before Lightning fails deep inside, naming the
    override that works; returns Trainer arguments to replace (16-mixed on CPU: bf16-mixed, said once)."""
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        asked = " and ".join(f"{k}={v}" for k, v in hydra_choices(("experiment", "trainer")).items()
                             if v in ("full_data", "ddp", "fsdp", "gpu")) or f"trainer.accelerator={accelerator}"
        raise UserError(f"{asked} asks for GPUs, but torch finds none on this machine; on CPU add "
                        "trainer=cpu (one process) or trainer.accelerator=cpu trainer.devices=2 (DDP, 2 processes)")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    precision = str(trainer.get("precision"))
    if uses_fsdp(trainer):
        check_fsdp(trainer, precision, on_cpu)
    if on_cpu and precision in HALF_TRUE:
        raise UserError(f"trainer.precision={precision} on CPU: PyTorch's CPU kernels cannot run a float16 model "
                        "(it fails with 'mixed dtype (CPU)'); use trainer.precision=bf16-mixed (the default) or 32")
    if on_cpu and precision in ("16-mixed", "16"):
        say(f"trainer.precision={precision} on CPU runs bf16-mixed (CPU autocast has no float16)")
        precision = "bf16-mixed"
    if on_cpu and precision.startswith("bf16") and not cpu_has_native_bf16():
        # emulated bf16 ran ~60x slower per matmul than fp32 on a 2-core AVX2 EPYC (the embedded default:
        # ~50 min instead of ~6): what a user asking for speed wants is fp32 here, said in one line
        say(f"trainer.precision={precision}: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where bf16 is "
            "emulated and many times slower; running 32-true instead (on CPUs with native bf16 it is kept)")
        precision = "32-true"
    return {"precision": precision} if precision != str(trainer.get("precision")) else {}


FSDP_STRATEGY = "ModelParallelStrategy"
# what Lightning's ModelParallelStrategy accepts (it raises ValueError for the rest, 16-mixed among them)
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true")


def uses_fsdp(trainer: DictConfig) -> bool:
    """Whether the trainer config is `trainer=fsdp` (a strategy whose `_target_` is Lightning's
    ModelParallelStrategy, which model/sharding.py drives)."""
    strategy = trainer.get("strategy")
    return hasattr(strategy, "get") and str(strategy.get("_target_", "")).endswith(FSDP_STRATEGY)


def check_fsdp(trainer: DictConfig, precision: str, on_cpu: bool) -> None:
    """UserError for `trainer=fsdp` settings it cannot run: one process (nothing to shard across), or a
    precision FSDP2 under Lightning has no support for (16-mixed: no gradient scaler)."""
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes", 1) or 1)
    if str(devices) in ("1", "[0]") and nodes == 1:
        raise UserError("trainer=fsdp with trainer.devices=1: one process has nothing to shard across; use "
                        "trainer=gpu (or trainer=cpu), or trainer.devices=2 or more (on CPU: trainer.accelerator=cpu "
                        "trainer.devices=2)")
    if precision in ("16-mixed", "16") and not on_cpu:
        raise UserError(f"trainer.precision={precision} with trainer=fsdp: Lightning's FSDP2 strategy has no float16 "
                        "gradient scaler; use trainer.precision=bf16-mixed (GPUs since Ampere) or 32-true")
    if precision not in FSDP_PRECISIONS and precision not in ("16-mixed", "16"):
        raise UserError(f"trainer.precision={precision} with trainer=fsdp; choose one of "
                        f"{', '.join(p for p in FSDP_PRECISIONS if p != '32')}")


def hydra_choices(groups: tuple[str, ...]) -> dict[str, str]:
    """The chosen option of each config group (`experiment=full_data`), when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {g: str(choices[g]) for g in groups if choices.get(g)}
