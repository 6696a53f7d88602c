"""Prompt-grouped splits: the `val_fraction` hold-out and the k folds of cross-validation.

Rows that share a normalised prompt (the same question asked of many model pairs) must fall in one
fold, or the out-of-fold score leaks. Within that constraint, groups are placed greedily (largest
first, equal sizes in a seeded hash order, so the assignment does not depend on row order) into the
fold where each class's share stays closest to 1 / n_folds: a stratified group k-fold. The hold-out
split takes whole groups in a seeded hash order until `val_fraction` of the rows is reached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pref_lightning.core.errors import UserError
from pref_lightning.data.records import PairRecord


def prompt_key(record: PairRecord) -> str:
    """Normalised prompt text: rows sharing it must fall on the same side of a split."""
    return " ".join(" ".join(record.prompt).lower().split())


def grouped_split(records: Sequence[PairRecord], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) with whole prompt groups in validation, chosen by a seeded hash order.

    Hashing the group key (rather than shuffling positions) makes the split independent of row order.
    """
    return grouped_split_keys([prompt_key(record) for record in records], val_fraction, seed)


def grouped_split_keys(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`grouped_split` from the rows' prompt keys alone (what the data cache stores)."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups, key=lambda k: hashlib.sha1(f"{seed}\0{k}".encode()).hexdigest())
    target = val_fraction * len(keys)
    val: list[int] = []
    for key in order:
        if len(val) >= target:
            break
        val.extend(groups[key])
    if len(val) == len(keys) or not val:
        raise UserError(
            f"cannot hold out data.val_fraction={val_fraction} of {len(keys)} rows "
            f"({len(groups)} distinct prompts)"
        )
    val_set = set(val)
    return [i for i in range(len(keys)) if i not in val_set], sorted(val)


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
