"""What each training pair is trained towards beyond its hard label: its `ties` flag and loss `weight`
(extra sources, see `sources.py`) and its target probabilities (a teacher file, `teacher.py`, mixed with the
hard label; a pseudo-labelled source's own teacher)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pref_lightning.core.errors import UserError
from pref_lightning.core.losses import TEACHER_MISSING, mix_targets
from pref_lightning.data.loading import TrainingData
from pref_lightning.data.pairs import EncodedPair
from pref_lightning.data.teacher import read_teacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSettings:
    """`data.teacher_path` (None: no teacher) and how its probabilities are used: mixed with the hard label
    by `weight`, sharpened by `temperature`; training rows the file lacks: an error, or hard labels only.

    Raises UserError naming the data key for a value out of range."""

    path: str | None = None
    weight: float = 0.5
    temperature: float = 1.0
    missing: str = "error"

    def __post_init__(self) -> None:
        if self.missing not in TEACHER_MISSING:
            raise UserError(f"data.teacher_missing={self.missing!r}; choose from {', '.join(TEACHER_MISSING)}")
        if not 0.0 <= self.weight <= 1.0:
            raise UserError(f"data.teacher_weight={self.weight} must lie in [0, 1]")
        if not self.temperature > 0:
            raise UserError(f"data.teacher_temperature={self.temperature} must be > 0")
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "temperature", float(self.temperature))


def attach_row_targets(pairs: list[EncodedPair], data: TrainingData, teacher: TeacherSettings) -> dict[str, Any] | None:
    """Set, per training pair (in `data.train_records` order), its `ties` flag, loss `weight` and `source` index
    (extra sources) and its `target` probabilities (n_classes,): the teacher's mixed with the hard label, a pseudo-labelled
    row's own teacher's, or, without a teacher, none (the hard label) unless some row has a pseudo target.
    Returns the teacher's counts for `data_counts["teacher"]` (None without a teacher).

    Raises DataError for a teacher file that lacks training rows (`missing="error"`) or holds no probabilities."""
    if data.ties is not None:
        for pair, ties, weight in zip(pairs, data.ties, data.loss_weights):
            pair.ties, pair.weight = bool(ties), float(weight)
    if data.sources is not None:
        for pair, source in zip(pairs, data.sources):
            pair.source = int(source)
    pseudo = data.pseudo_targets or []
    if not teacher.path:
        if any(t is not None for t in pseudo):
            # a batch holds targets for every row or for none: a labelled row's target is its one-hot label
            # (the same cross-entropy as the hard label)
            eye = np.eye(data.n_classes, dtype=np.float32)
            for i, pair in enumerate(pairs):
                target = pseudo[i] if i < len(pseudo) else None
                pair.target = target if target is not None else eye[pair.label]
        return None
    soft, counts = read_teacher(teacher.path, data.train_ids, data.n_classes, teacher.temperature, teacher.missing)
    labels = np.array([p.label for p in pairs], dtype=np.int64)
    ties = np.array([p.ties for p in pairs], dtype=bool)
    for pair, target in zip(pairs, mix_targets(labels, soft, teacher.weight, ties)):
        pair.target = target
    for pair, target in zip(pairs, pseudo):  # a pseudo-labelled row keeps its own source's teacher
        if target is not None:
            pair.target = target
    log.info("teacher %s: %d of %d training rows matched by id (weight %g, temperature %g)", teacher.path,
             counts["training_rows_matched"], len(pairs), teacher.weight, teacher.temperature)
    return {**counts, "weight": teacher.weight, "missing": teacher.missing}
