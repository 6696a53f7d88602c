"""Settings checked against the backbone before any data is read.

A setting that contradicts the backbone otherwise fails late and cryptically: `data.max_length=1024` on
MiniLM (512 absolute positions) tokenizes the whole file, then crashes inside the embeddings with "The
expanded size of the tensor (1024) must match the existing size (512)"; a tokenizer with more tokens than
the embedding matrix has rows indexes out of range (a device-side assert on a GPU). Each check here raises
one `ValueError` line naming the key, the value and the backbone's limit. Nothing is adjusted silently.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pref_lightning.backbone import TINY, TRUST_REMOTE_CODE, resolve_backbone, tiny_config

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
    """ValueError when `max_length` tokens per sequence exceed what the backbone's positions index."""
    limit = position_limit(config)
    if limit is not None and int(max_length) > limit:
        name = backbone or getattr(config, "_name_or_path", "") or config.model_type
        raise ValueError(f"{key}={max_length} exceeds the backbone's limit: {name} ({config.model_type}) has "
                         f"{limit} absolute positions (max_position_embeddings); set {key}={limit} or less")


def check_vocabulary(config: PretrainedConfig, tokenizer, key: str = "model.tokenizer", backbone: str = "") -> None:
    """ValueError when the tokenizer can produce ids the backbone's embedding matrix has no row for."""
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > int(rows):
        name = backbone or config.model_type
        raise ValueError(f"{key}: the tokenizer has {len(tokenizer)} tokens but the backbone {name} embeds only "
                         f"{rows} (vocab_size); use the tokenizer saved with that backbone")
