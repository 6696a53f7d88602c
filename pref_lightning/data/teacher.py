"""A teacher's probabilities joined to training rows by id (`data.teacher_path`): distillation and pseudo-labels.

The teacher file is what this project writes: `predict.py`'s submission (`id, winner_model_a,
winner_model_b, winner_tie`) or a run's / a sweep's `oof.csv` (the same columns plus `fold`, `label`);
other columns are ignored. Its values are probabilities (each in [0, 1], each row summing to 1);
`data.teacher_temperature` T turns p into p^(1/T) renormalised, i.e. softmax(teacher logit / T).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pref_lightning.core.losses import TEACHER_MISSING, sharpen
from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.data.records import DataError, read_table, require_columns

SUM_TOLERANCE = 1e-3  # a row's probabilities must sum to 1 within this (files hold 8 significant digits)


def read_teacher(path: str | Path, ids: Sequence[str], n_classes: int = 3, temperature: float = 1.0,
                 missing: str = "error") -> tuple[np.ndarray, dict]:
    """Teacher probabilities of the rows `ids`: (len(ids), n_classes) float64, a row of NaN where the file
    has no such id (only with `missing="hard"`), and counts for metrics.json.

    Raises `DataError` (one line) for a missing column, a duplicate id, a value that is not a probability
    (naming file, id and column) and, with `missing="error"`, for training ids absent from the file
    (naming the first few).
    """
    if missing not in TEACHER_MISSING:
        raise DataError(f"data.teacher_missing={missing!r}; choose from {', '.join(TEACHER_MISSING)}")
    columns = list(CLASS_COLUMNS[:n_classes])
    frame = read_table(path)
    require_columns(frame, ["id", *columns], path)
    file_ids = frame["id"].map(lambda v: str(v).strip())
    repeated = file_ids[file_ids.duplicated()]
    if len(repeated):
        raise DataError(f"{path}: column id has duplicate value(s): {', '.join(sorted(set(repeated))[:5])}")
    values = np.empty((len(frame), n_classes), dtype=np.float64)
    for j, column in enumerate(columns):
        numbers = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) | (numbers < 0) | (numbers > 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: row id={file_ids.iloc[i]}: column {column} has {frame[column].iloc[i]!r}, "
                            "expected a probability in [0, 1]")
        values[:, j] = numbers
    sums = values.sum(axis=1)
    if n_classes == len(CLASS_COLUMNS):
        off = np.flatnonzero(np.abs(sums - 1.0) > SUM_TOLERANCE)
        if len(off):
            i = int(off[0])
            raise DataError(f"{path}: row id={file_ids.iloc[i]}: columns {', '.join(columns)} sum to {sums[i]:.6g}, "
                            "not 1 (the teacher file holds probabilities)")
    if (sums <= 0).any():
        i = int(np.flatnonzero(sums <= 0)[0])
        raise DataError(f"{path}: row id={file_ids.iloc[i]}: columns {', '.join(columns)} are all 0")
    values = sharpen(values / sums[:, None], float(temperature))
    position = {row_id: i for i, row_id in enumerate(file_ids)}
    found = np.array([position.get(row_id, -1) for row_id in ids], dtype=np.int64)
    absent = [row_id for row_id, i in zip(ids, found) if i < 0]
    if absent and missing == "error":
        raise DataError(f"{path}: {len(absent)} of {len(ids)} training rows have no teacher row (id "
                        f"{', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}); add them, or set "
                        "data.teacher_missing=hard to train them on their hard labels")
    soft = np.full((len(ids), n_classes), np.nan)
    soft[found >= 0] = values[found[found >= 0]]
    counts = {"path": str(path), "temperature": float(temperature), "rows_in_file": len(frame),
              "training_rows_matched": int((found >= 0).sum()), "training_rows_hard_only": len(absent)}
    return soft, counts
