"""Stages: a run that starts from another run's checkpoint, and a frozen earlier stage read by the anchor.

Two ways a later stage uses an earlier one (the winners' recipe: pre-train the encoder as a preference
model on a large pool of pairs, then fine-tune on the competition rows; 5th place LMSYS "up to 20 points",
1st and 2nd place post-pretraining on UltraFeedback):

- `model.init_from=CKPT` (`read_init` + `apply_init`): the backbone starts from the checkpoint's weights,
  and the head too when it has the same shape (same classes, pooling, statistics); a fresh head otherwise
  (a binary stage-1 model -> a 3-way arena model). The ancestry is recorded as `lineage` in the model's
  hyperparameters, hence in every checkpoint and in `metrics.json`.
- `model.text_anchor=CKPT` (`read_text_scorer`): the checkpoint's whole network, frozen, scores every pair;
  its swap-averaged logits become one more per-side column (`text_side_columns`) of the anchored head's
  regression, fitted on the training rows, so that the step-0 model already reads the text (stacking, as
  the top LMSYS solutions stacked fold models' logits with length features). The scorer's weights travel
  in the checkpoint (`text_scorer.*`), so prediction needs nothing but the checkpoint file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pref_lightning.core.errors import UserError
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, load_checkpoint

log = logging.getLogger(__name__)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's first 16 MiB and its size: identifies a checkpoint in a lineage, cheaply."""
    path = Path(path)
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(16 << 20))
    return digest.hexdigest()[:16]


def lineage_entry(path: str | Path, checkpoint: Mapping[str, Any], role: str) -> dict[str, Any]:
    """What a lineage records of one ancestor checkpoint (plain values, saved in hparams)."""
    hparams = checkpoint["hyper_parameters"]
    spec = hparams.get("spec") or {}
    reference = hparams.get("reference") or {}
    return {"role": role, "path": str(Path(path).resolve()), "fingerprint": file_fingerprint(path),
            "backbone": str(hparams.get("backbone")), "n_classes": int(spec.get("n_classes", 3)),
            "layout": str(spec.get("layout", "siamese")),
            "val_log_loss": reference.get("val_log_loss"),
            "parents": list(hparams.get("lineage") or [])}


def read_init(path: str | Path) -> dict[str, Any]:
    """The checkpoint `model.init_from` names: {"state_dict", "lineage" (list of ancestors, this one last),
    "tokenizer_files", "n_classes"}. Raises MissingFileError / UserError naming the file."""
    checkpoint = load_checkpoint(path)
    stored = checkpoint[CHECKPOINT_KEY]
    entry = lineage_entry(path, checkpoint, "init_from")
    return {"state_dict": checkpoint["state_dict"], "lineage": [*entry.pop("parents"), entry],
            "tokenizer_files": stored["tokenizer_files"], "n_classes": entry["n_classes"],
            "base_model": stored.get("base_model"), "path": str(path)}


def apply_init(model: nn.Module, init: Mapping[str, Any]) -> dict[str, Any]:
    """Copy the init checkpoint's backbone weights into `model.backbone` (every tensor must match: same
    architecture) and its head's when every head tensor has the same shape; returns what was loaded
    ({"backbone_tensors", "head": "loaded" | "fresh", "why"}). Raises UserError naming the file when the
    backbones differ."""
    state = init["state_dict"]
    where = init["path"]
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    missing = [k for k in backbone if k not in own]
    wrong = [k for k in backbone if k in own and own[k].shape != backbone[k].shape]
    if not backbone or missing or wrong:
        detail = missing[:1] or [f"{k} {tuple(backbone[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:1]]
        raise UserError(f"model.init_from={where}: its backbone is not this model's backbone "
                        f"({len(missing)} unknown and {len(wrong)} differently shaped tensors, e.g. {detail or 'none stored'}); "
                        "start from a checkpoint of the same backbone (model.backbone)")
    # the head compared without the extra sources' output layers (model.source_heads): a one-head checkpoint
    # starts a source-heads model's shared head and source 0's output; the extra ones load when both have them
    extra = "head.source_outputs."
    head = {k: v for k, v in state.items() if k.startswith("head.") and not k.startswith(extra)}
    own_head = {k for k in own if k.startswith("head.") and not k.startswith(extra)}
    same_head = bool(head) and set(head) == own_head and all(own[k].shape == v.shape for k, v in head.items())
    outputs = {k: v for k, v in state.items() if k.startswith(extra) and k in own and own[k].shape == v.shape}
    loaded = {**backbone, **({**head, **outputs} if same_head else {})}
    with torch.no_grad():
        for name, tensor in loaded.items():
            own[name].copy_(tensor.to(own[name].dtype))
    why = "same shape" if same_head else (
        f"fresh: the init head predicts {init['n_classes']} classes" if init["n_classes"] != model.n_classes
        else "fresh: another head shape (statistics, pooling or combination differ)")
    info = {"backbone_tensors": len(backbone), "head": "loaded" if same_head else "fresh", "why": why}
    log.info("model.init_from=%s: %d backbone tensors loaded; head %s", where, len(backbone), why)
    return info


def read_text_scorer(path: str | Path, layout: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
    """The frozen stage `model.text_anchor` names: (settings for the model's `text_anchor` argument:
    {"hparams", "backbone_config", "source"}, its weights, its tokenizer files). Raises UserError naming the
    file when it cannot score one side at a time without side statistics (a siamese model trained with
    `model.use_text_stats=false` and no anchored head), which the later stage's normalisation would not fit."""
    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    spec = hparams.get("spec") or {}
    if layout != "siamese" or spec.get("layout", "siamese") != "siamese":
        raise UserError(f"model.text_anchor={path}: the text anchor scores siamese pairs; both this run "
                        "(data.layout) and that checkpoint must use data.layout=siamese")
    if hparams.get("use_text_stats", True) or hparams.get("anchor_head") or hparams.get("reward_score"):
        raise UserError(f"model.text_anchor={path}: that checkpoint reads side statistics (model.use_text_stats, "
                        "anchor_head or reward_score); a text anchor must read the text alone: train it with "
                        "model.use_text_stats=false model.anchor_head=false (experiment=pairs_stage1)")
    if checkpoint[CHECKPOINT_KEY].get("base_model"):
        raise UserError(f"model.text_anchor={path}: a LoRA checkpoint (no base weights inside) cannot be a text "
                        "anchor; export it merged first (python -m pref_lightning.model.merge export)")
    hparams.pop("compile", None)
    entry = lineage_entry(path, checkpoint, "text_anchor")
    settings = {"hparams": {**hparams, "compile": False},
                "backbone_config": dict(checkpoint[CHECKPOINT_KEY]["backbone_config"]),
                "source": {k: v for k, v in entry.items() if k != "parents"}}
    weights = {k: v for k, v in checkpoint["state_dict"].items()}
    return settings, weights, checkpoint[CHECKPOINT_KEY]["tokenizer_files"]


def same_vocabulary(files: Mapping[str, bytes], tokenizer: Any) -> bool:
    """Does the tokenizer stored as `files` (a checkpoint's) map every token to the same id as `tokenizer`,
    special tokens included? (Saved files can differ in bytes, e.g. truncation settings, for one vocabulary.)"""
    from pref_lightning.data.tokenizers import tokenizer_from_files

    stored = tokenizer_from_files(files)
    return stored.get_vocab() == tokenizer.get_vocab() and stored.all_special_ids == tokenizer.all_special_ids


def text_side_columns(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-side text scores (n, 1) each of a scorer's swap-averaged pair logits (n, K): with ties (K = 3)
    z_A - z_tie and z_B - z_tie, without (K = 2) +-(z_A - z_B)/2. Invariant to a shift of the logits, and
    exchanged exactly when A and B are (the scorer is swap-averaged), so the anchor's [a, b, a - b, |a - b|]
    features of them keep its position symmetry."""
    if logits.shape[-1] == 3:
        return (logits[:, 0:1] - logits[:, 2:3]), (logits[:, 1:2] - logits[:, 2:3])
    half = 0.5 * (logits[:, 0:1] - logits[:, 1:2])
    return half, -half


@torch.no_grad()
def score_columns(score: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], pairs: Sequence[Any],
                  collate: Callable, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Text columns of sides A and B ((n, 1) float64 each) for encoded `pairs`, scored in batches by
    `score` (a batch dict -> (n, K) swap-averaged logits), in `pairs` order."""
    firsts, seconds = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate(list(pairs[start:start + batch_size]))
        a, b = text_side_columns(score(batch).float())
        firsts.append(a.cpu().numpy())
        seconds.append(b.cpu().numpy())
    if not firsts:
        return np.zeros((0, 1)), np.zeros((0, 1))
    return np.concatenate(firsts).astype(np.float64), np.concatenate(seconds).astype(np.float64)
