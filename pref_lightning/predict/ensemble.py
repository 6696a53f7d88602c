"""Ensembles for `predict.py`: which checkpoints, with which weights, and how their outputs are averaged.

`ckpt_path` is one checkpoint or a list of checkpoints and run folders (a run folder means its
`checkpoints/best.ckpt`); `ckpt_weights` weights them (null: equally; normalised to sum to 1);
`ensemble_mode=probs` averages each model's probabilities, `ensemble_mode=logits` averages the
(temperature-scaled) logits and takes one softmax. Each model keeps its own tokenizer, data settings and
swap TTA; `pipeline.predict` runs them one after the other and calls `combine`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.core.metrics import softmax

MODES = ("probs", "logits")
BEST = Path("checkpoints") / "best.ckpt"


def checkpoint_paths(ckpt_path: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The checkpoint files named by `ckpt_path` (a path or a list of paths; run folders -> best.ckpt)."""
    entries = [ckpt_path] if isinstance(ckpt_path, str | os.PathLike) else list(ckpt_path)
    if not entries:
        raise UserError("ckpt_path is an empty list; give a checkpoint, a run folder or a list of them")
    paths = []
    for entry in entries:
        path = Path(str(entry))
        if path.is_dir():
            if not (path / BEST).is_file():
                raise MissingFileError(f"ckpt_path entry {path} is a folder without {BEST} (not a run folder)")
            path = path / BEST
        elif not path.is_file():
            raise MissingFileError(f"ckpt_path entry {path} does not exist")
        paths.append(path)
    return paths


def ensemble_weights(weights: Sequence[float] | None, n_models: int) -> np.ndarray:
    """Normalised weights, one per model (None: equal)."""
    if weights is None:
        return np.full(n_models, 1.0 / n_models)
    values = np.asarray(list(weights), dtype=np.float64)
    if values.shape != (n_models,):
        raise UserError(f"ckpt_weights has {values.size} entries for {n_models} checkpoint(s)")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise UserError(f"ckpt_weights={values.tolist()}: need finite non-negative weights with a positive sum")
    return values / values.sum()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"ensemble_mode={mode!r}; choose {' or '.join(MODES)}")
    return mode


def combine(logits: Sequence[np.ndarray], weights: np.ndarray, mode: str = "probs") -> np.ndarray:
    """Probabilities (n, 3) of the ensemble of per-model `logits` (each (n, 3), same rows)."""
    check_mode(mode)
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} models but {len(weights)} weights")
    if any(x.shape != logits[0].shape for x in logits):
        raise ValueError(f"models predicted different shapes: {[x.shape for x in logits]}")
    if mode == "logits":
        return softmax(sum(w * np.asarray(x, dtype=np.float64) for w, x in zip(weights, logits)))
    if len(logits) == 1:
        return softmax(logits[0])  # a single model: exactly its own probabilities
    probs = sum(w * softmax(np.asarray(x, dtype=np.float64)) for w, x in zip(weights, logits))
    return probs / probs.sum(axis=1, keepdims=True)
