"""K-fold assignment for cross-validation: whole prompt groups per fold, classes balanced, seeded.

Rows that share a normalised prompt (the same question asked of many model pairs) must fall in one
fold, or the out-of-fold score leaks. Within that constraint, groups are placed greedily (largest
first, equal sizes in a seeded hash order, so the assignment does not depend on row order) into the
fold where each class's share stays closest to 1 / n_folds: a stratified group k-fold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pref_lightning.errors import UserError


def assign_folds(keys: Sequence[str], labels: np.ndarray, n_folds: int, seed: int, n_classes: int = 3) -> np.ndarray:
    """Fold (0..n_folds-1) of every row, given each row's prompt key and label."""
    labels = np.asarray(labels, dtype=np.int64)
    if n_folds < 2:
        raise UserError(f"data.n_folds={n_folds} must be at least 2")
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} prompt keys but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"fold assignment needs labels in 0..{n_classes - 1}")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if len(groups) < n_folds:
        raise UserError(f"cannot make data.n_folds={n_folds} folds from {len(groups)} distinct prompts")
    order = sorted(groups, key=lambda k: (-len(groups[k]), hashlib.sha1(f"{seed}\0{k}".encode()).hexdigest()))
    totals = np.maximum(np.bincount(labels, minlength=n_classes), 1).astype(np.float64)
    counts = np.zeros((n_folds, n_classes))
    folds = np.empty(len(labels), dtype=np.int64)
    for key in order:
        rows = groups[key]
        group = np.bincount(labels[rows], minlength=n_classes)
        # squared per-class shares after adding the group: lowest where the group's classes are scarcest
        cost = (((counts + group) / totals) ** 2).sum(1)
        best = int(np.lexsort((np.arange(n_folds), counts.sum(1), cost))[0])
        counts[best] += group
        folds[rows] = best
    return folds


def fold_split(folds: np.ndarray, fold: int) -> tuple[list[int], list[int]]:
    """(train, validation) row indices for `fold`: validation is that fold, training all the others."""
    n_folds = int(folds.max()) + 1
    if not 0 <= fold < n_folds:
        raise UserError(f"data.fold={fold} outside 0..{n_folds - 1}")
    return np.flatnonzero(folds != fold).tolist(), np.flatnonzero(folds == fold).tolist()
