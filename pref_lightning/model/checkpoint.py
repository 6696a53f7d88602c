"""Checkpoint files: safe loading, the payload format and its version, conversion of older versions.

A pref-lightning checkpoint is Lightning's dict plus one entry, `CHECKPOINT_KEY`, holding what
prediction needs beyond the weights and the hyperparameters (which carry the encoding contract,
`hyper_parameters["spec"]`): the backbone's config, the tokenizer's files and the fitted temperature.

Format versions:
- 1: encoding settings in the payload (`data_settings`), `layout`/`n_classes` in the hyperparameters,
  the class prior and the reference losses in the payload;
- 2 (`CHECKPOINT_FORMAT`): the encoding contract, the class prior and the references in the
  hyperparameters (the module's constructor arguments).

`load_checkpoint` converts version 1 in memory; any other version is a `UserError` naming the file.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pref_lightning.core.atomic import atomic_path
from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.data.contract import LEGACY_STATS_FEATURES

CHECKPOINT_KEY = "pref_lightning"
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Layers the head never uses must not be built: DDP (find_unused_parameters=False, the fast default)
# fails at the second step on parameters that got no gradient, and they would cost memory and
# optimizer state. The head reads `last_hidden_state` only, so a [CLS] pooler (BERT, MiniLM, RoBERTa,
# ELECTRA-style encoders) is dead weight; DeBERTa-v2/v3's AutoModel has none.
UNUSED_LAYERS = ("pooler",)


def check_checkpoint_file(path: str | Path) -> None:
    """Cheap checks before anything is built: the file exists and is a zip archive (as torch.save writes)."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a pref-lightning checkpoint (not a PyTorch checkpoint file)")


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """A pref-lightning checkpoint loaded safely (`weights_only=True`), in the current format.

    Raises `UserError` naming the file for any other file (the fix is never to turn safe loading off,
    so torch's advice to do that is not passed on) and for an unsupported format version.
    """
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        reason = "it holds Python objects that safe loading (weights_only) refuses"
    except (RuntimeError, EOFError, ValueError):
        reason = "not a PyTorch checkpoint file"
    else:
        if isinstance(checkpoint, dict) and CHECKPOINT_KEY in checkpoint:
            return upgrade(checkpoint, path)
        reason = f"no '{CHECKPOINT_KEY}' entry"
    raise UserError(f"{path}: not a pref-lightning checkpoint ({reason})")


def upgrade(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """`checkpoint` in format `CHECKPOINT_FORMAT` (converted in memory from an older readable format)."""
    payload = checkpoint[CHECKPOINT_KEY]
    version = payload.get("format")
    if version not in READABLE_FORMATS:
        raise UserError(f"{path}: checkpoint format {version!r} is not supported by this version of pref-lightning "
                        f"(it reads formats {', '.join(map(str, READABLE_FORMATS))}; this one writes {CHECKPOINT_FORMAT})")
    if version == 1:
        hparams = dict(checkpoint["hyper_parameters"])
        settings = dict(payload.pop("data_settings"))
        settings["layout"] = hparams.pop("layout", settings.get("layout", "siamese"))
        settings["n_classes"] = hparams.pop("n_classes", 3)
        settings.setdefault("stats_features", list(LEGACY_STATS_FEATURES))  # format 1 had these, unnamed
        hparams["spec"] = settings  # the remaining keys had the names EncodingSpec gives them
        hparams["train_prior"] = list(payload.pop("train_prior", []))
        hparams["reference"] = dict(payload.pop("reference", {}))
        checkpoint["hyper_parameters"] = hparams
        payload["format"] = CHECKPOINT_FORMAT
    return checkpoint


def payload(backbone_config: Mapping[str, Any], tokenizer_files: Mapping[str, bytes],
            temperature: float) -> dict[str, Any]:
    """The `CHECKPOINT_KEY` entry the module writes into every checkpoint."""
    return {"format": CHECKPOINT_FORMAT, "backbone_config": dict(backbone_config),
            "tokenizer_files": dict(tokenizer_files), "temperature": float(temperature)}


def store_temperature(path: str | Path, temperature: float) -> None:
    """Write the fitted calibration temperature into the checkpoint file at `path` (atomically)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state[CHECKPOINT_KEY]["temperature"] = float(temperature)
    atomic_torch_save(state, path)


def store_in_payload(path: str | Path, **entries: Any) -> None:
    """Write `entries` (plain values) into the payload of the checkpoint file at `path` (atomically), e.g.
    `precision`: the precision training actually ran in, which `predict.py` uses unless told otherwise."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state[CHECKPOINT_KEY].update(entries)
    atomic_torch_save(state, path)


def recorded_precision(path: str | Path) -> str | None:
    """The training precision a checkpoint records (None: not recorded, checkpoints written before it was);
    memory-mapped, so reading it costs little even for a large checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, pickle.UnpicklingError):
        return None
    value = state.get(CHECKPOINT_KEY, {}).get("precision") if isinstance(state, dict) else None
    return str(value) if value else None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def without_unused_weights(state_dict: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's weights less those of backbone layers no longer built (the pooler of checkpoints
    saved before backbones were built without it)."""
    own = module.state_dict()
    prefixes = tuple(f"backbone.{name}." for name in UNUSED_LAYERS)
    return {k: v for k, v in state_dict.items() if k in own or not k.startswith(prefixes)}
