"""Predictions -> submission files: the Kaggle LMSYS columns or the WSDM Cup winner column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pref_lightning.core.atomic import atomic_write_text
from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.data.records import FLOAT_FORMAT


def submission_frame(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Kaggle columns: id and one probability per class (a binary model has no winner_tie column)."""
    frame = pd.DataFrame({"id": ids})
    for j, name in enumerate(CLASS_COLUMNS[: probs.shape[1]]):
        frame[name] = probs[:, j].astype(np.float64)  # one text format for float32 and float64 models
    return frame


def winner_frame(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """WSDM Cup columns: id, winner in {model_a, model_b} (the likelier of the two; ties are not an answer)."""
    return pd.DataFrame({"id": ids, "winner": np.where(probs[:, 0] >= probs[:, 1], "model_a", "model_b")})


SUBMISSION_FORMATS = ("kaggle", "wsdm")


def submission_format(cfg: DictConfig, records) -> str:
    """`submission_format` as configured, else `wsdm` for WSDM input, else `kaggle`."""
    chosen = cfg.get("submission_format")
    if chosen is None:
        formats = {r.extra.get("format") for r in records[:1]}
        chosen = "wsdm" if formats == {"wsdm"} else "kaggle"
    if chosen not in SUBMISSION_FORMATS:
        raise UserError(f"submission_format={chosen!r}; choose from {', '.join(SUBMISSION_FORMATS)}")
    return chosen


def write_submission(path: str | Path, ids: list[str], probs: np.ndarray, fmt: str) -> Path:
    """Write `probs` (n, K) for `ids` as the `fmt` submission at `path` (atomically); return the path."""
    frame = winner_frame(ids, probs) if fmt == "wsdm" else submission_frame(ids, probs)
    atomic_write_text(Path(path), frame.to_csv(index=False, float_format=FLOAT_FORMAT))
    return Path(path)
