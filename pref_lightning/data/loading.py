"""Training data as one value: data files -> records -> the train/validation split, plus the extra sources'
rows and their ties / loss weights / pseudo-label targets (`TrainingData`).

`load_training_data` is the one entry point, and the one place that decides how a training file is read:

* a Kaggle-format file read strictly (`on_bad_rows=raise`, 3 classes, no extra sources) with a cache
  folder: through `CachedFile`, a memo over the strict reader (`records.read_records`) and the on-disk
  cache (`cache.PairCache`) keyed by file hash, whether labels are required, the spec's tokenization
  settings and the code that parsed / split / encoded it. A cached run parses no JSON and tokenizes nothing;
  its records are `LazyRecords`.
* any other file, format or policy: through the adapters (`adapters.read_source`) and the extra sources
  (`sources.mix_sources`).
* no file: the embedded synthetic set, generated in memory (never cached).

The three give the same records for a file all of them can read; they differ in what they count into
`data_counts` (metrics.json) and in whether rows carry tie flags and loss weights, which is kept as it was.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pref_lightning.core.metrics import class_prior, log_loss, prior_log_loss
from pref_lightning.data.adapters import read_source, sniff_format
from pref_lightning.data.cache import (
    EncodedTable,
    LazyRecords,
    PairCache,
    RowTable,
    encode_table,
    file_sha256,
    pairs_key_fields,
    rows_key_fields,
)
from pref_lightning.data.folds import assign_folds, fold_split, grouped_split_keys, prompt_key
from pref_lightning.data.pairs import PairEncoder
from pref_lightning.data.records import PairRecord, label_array, read_records, records_from_frame
from pref_lightning.data.sources import SourceSpec, mix_sources
from pref_lightning.data.synthetic import generate

log = logging.getLogger(__name__)


# ---- one file through the on-disk cache ----------------------------------------------------------
class CachedFile:
    """One Kaggle-format data file served through a `PairCache`: its row table (split inputs), its records
    (parsed only when asked for) and its encoded pairs (per encoder settings), each computed at most once."""

    def __init__(self, path: str | Path, require_labels: bool, cache: PairCache) -> None:
        self.path = Path(path)
        self.require_labels = require_labels
        self.cache = cache
        self._records: list[PairRecord] | None = None
        self._rows: RowTable | None = None
        self._tables: dict[str, EncodedTable] = {}

    @property
    def file_hash(self) -> str:
        if not self.path.is_file():
            self.records()  # raises the reader's DataError naming the file
        return file_sha256(self.path)

    def records(self) -> list[PairRecord]:
        if self._records is None:
            self._records = read_records(self.path, require_labels=self.require_labels)
        return self._records

    def rows(self) -> RowTable:
        """Prompt keys, labels, oracle probabilities of every row: from the cache, else parsed (and stored)."""
        if self._rows is None:
            fields = rows_key_fields(self.file_hash, self.require_labels)
            table = self.cache.load_rows(fields)
            if table is None:
                table = RowTable.from_records(self.records(), prompt_key)
                self.cache.save_rows(fields, table)
            self._rows = table
        return self._rows

    def _fields(self, encoder: PairEncoder) -> dict:
        return pairs_key_fields(self.file_hash, encoder, self.require_labels)

    def has_pairs(self, encoder: PairEncoder) -> bool:
        fields = self._fields(encoder)
        return self.cache.pairs_path(fields).name in self._tables or self.cache.pairs_path(fields).exists()

    def pairs(self, encoder: PairEncoder) -> EncodedTable:
        """Every row encoded in file order: from memory, from the cache, or tokenized now (and stored)."""
        fields = self._fields(encoder)
        name = self.cache.pairs_path(fields).name
        if name not in self._tables:
            self._tables[name] = self.cache.pairs_or_build(fields, lambda: self._encode(encoder))
        return self._tables[name]

    def _encode(self, encoder: PairEncoder) -> EncodedTable:
        records = self.records()
        if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off"):
            log.warning("TOKENIZERS_PARALLELISM=%s: the fast tokenizer runs on one thread",
                        os.environ["TOKENIZERS_PARALLELISM"])
        started = time.perf_counter()
        table = encode_table(encoder, records)
        log.info("%s: tokenized %d rows in %.1f s (cached in %s)", self.path, len(records),
                 time.perf_counter() - started, self.cache.folder)
        return table


class CachedFiles:
    """The `CachedFile` of each (path, labels required) of one cache folder, made once."""

    def __init__(self, cache: PairCache) -> None:
        self.cache = cache
        self._files: dict[tuple[str, bool], CachedFile] = {}

    def get(self, path: str | Path, require_labels: bool) -> CachedFile:
        key = (str(path), require_labels)
        if key not in self._files:
            self._files[key] = CachedFile(path, require_labels, self.cache)
        return self._files[key]


# ---- what a run reads, and how it splits --------------------------------------------------------
@dataclass(frozen=True)
class DataFiles:
    """The training data of a run: files (None: the embedded synthetic set), their format (None: detected),
    the bad-row policy, the task's classes and the extra training sources."""

    train_path: str | None = None
    val_path: str | None = None  # replaces the held-out split
    train_format: str | None = None
    on_bad_rows: str = "raise"
    n_classes: int = 3
    sources: tuple[SourceSpec, ...] = ()
    synthetic_rows: int = 10_000
    synthetic_seed: int = 0

    @property
    def source_name(self) -> str:
        if self.train_path:
            return str(self.train_path)
        return f"synthetic(rows={self.synthetic_rows}, seed={self.synthetic_seed})"

    def reads_plain_kaggle(self) -> bool:
        """One Kaggle-format file (and validation file) read strictly: the case the on-disk cache serves."""
        if not self.train_path or self.sources or self.on_bad_rows != "raise" or self.n_classes != 3:
            return False
        if self.train_format is None:
            return all(sniff_format(p) == "kaggle" for p in (self.train_path, self.val_path) if p)
        return self.train_format == "kaggle"


@dataclass(frozen=True)
class SplitPolicy:
    """How the training file is cut into training and validation rows, grouped by prompt: fold `fold` of
    `n_folds` (k-fold cross-validation), else a `val_fraction` split."""

    val_fraction: float = 0.1
    seed: int = 42
    n_folds: int | None = None
    fold: int = 0

    def split(self, keys: Sequence[str], labels: np.ndarray) -> tuple[list[int], list[int], np.ndarray | None]:
        """(train, validation) row indices and the fold of every row (None without folds)."""
        if not self.n_folds:
            train, val = grouped_split_keys(keys, self.val_fraction, self.seed)
            return train, val, None
        folds = assign_folds(keys, labels, self.n_folds, self.seed)
        train, val = fold_split(folds, self.fold)
        return train, val, folds


@dataclass
class TrainingData:
    """The records of a training run, split; everything later steps read about them.

    `train_records` are the training split's rows of the training file, then the extra sources' rows;
    `ties` / `loss_weights` / `pseudo_targets` / `sources` (None: all True / 1 / None / 0) are per training
    row; `sources` holds each row's source index (0 the training file, i + 1 the i-th extra source) and
    `n_sources` counts them (1 + the number of extra sources configured, whether or not each added rows).
    `train_rows` / `val_rows`: (cached file, row positions) when the split came from the cache.
    """

    train_records: Sequence[PairRecord]
    val_records: Sequence[PairRecord]
    n_classes: int
    data_counts: dict = field(default_factory=dict)  # rows read / skipped / deduplicated per file
    row_ids: list[str] | None = None  # ids of the training file's rows (fold files)
    folds: np.ndarray | None = None  # fold of every row of the training file
    train_file_keys: list[str] | None = None  # prompt keys of the training file's training rows
    train_rows: tuple[CachedFile, np.ndarray] | None = None
    val_rows: tuple[CachedFile, np.ndarray] | None = None
    ties: np.ndarray | None = None
    loss_weights: np.ndarray | None = None
    pseudo_targets: list[np.ndarray | None] | None = None
    sources: np.ndarray | None = None
    n_sources: int = 1

    @property
    def train_labels(self) -> np.ndarray:
        if self.train_rows is not None:
            source, rows = self.train_rows
            return source.rows().labels[rows]
        return label_array(self.train_records)

    @property
    def train_prior(self) -> np.ndarray:
        """Class frequencies (K,) of the training split. With tie-less rows (`ties` False), the prior the
        tie-aware loss fits: P(tie) from the rows that can tie, P(A) : P(B) from every row."""
        labels, ties = self.train_labels, self.ties
        if ties is None or ties.all() or self.n_classes < 3 or not ties.any():
            return class_prior(labels, self.n_classes)
        p_tie = float((labels[ties] == 2).mean())
        wins = np.bincount(labels[labels < 2], minlength=2).astype(np.float64)
        return np.array([*(1.0 - p_tie) * wins / max(wins.sum(), 1.0), p_tie])

    @staticmethod
    def _split_ids(cached: tuple[CachedFile, np.ndarray] | None, records: Sequence[PairRecord]) -> list[str]:
        """Row ids of a split: from the cached row table when the split came from it, else its records."""
        if cached is not None:
            source, rows = cached
            ids = source.rows().ids
            if ids is not None:
                return [ids[i] for i in rows]
        return [r.id for r in records]

    @property
    def train_ids(self) -> list[str]:
        """Row ids of the training split, in training order (extra sources' rows last)."""
        return self._split_ids(self.train_rows, self.train_records)

    @property
    def val_ids(self) -> list[str]:
        """Row ids of the validation split, in validation order."""
        return self._split_ids(self.val_rows, self.val_records)

    def fold_table(self) -> pd.DataFrame | None:
        """id and fold of every row of the training file (k-fold runs only; written as RUN/folds.csv)."""
        if self.folds is None:
            return None
        return pd.DataFrame({"id": self.row_ids, "fold": self.folds})

    def tokenizer_texts(self, max_rows: int = 20_000) -> list[str]:
        """Training texts to fit an offline tokenizer on (validation rows excluded)."""
        texts = []
        for record in self.train_records[:max_rows]:
            texts.extend(record.prompt)
            texts.extend(record.response_a)
            texts.extend(record.response_b)
        return texts

    def validation_reference(self) -> dict[str, float]:
        """Log losses to judge the model by on the validation split: the train prior, uniform, the
        validation rows' own class frequencies (the best constant prediction; an optimistic reference) and,
        where the rows carry one, the oracle."""
        if self.val_rows is not None:
            source, rows = self.val_rows
            val_labels = source.rows().labels[rows]
            oracle = source.rows().oracle
            probs = None if oracle is None else oracle[rows]
        else:
            val_labels = label_array(self.val_records)
            probs = None
            if all(r.oracle is not None for r in self.val_records):
                probs = np.array([r.oracle for r in self.val_records], dtype=np.float64)
        prior = np.broadcast_to(self.train_prior, (len(val_labels), self.n_classes))
        out = {"prior_log_loss": log_loss(prior, val_labels),
               "uniform_log_loss": float(np.log(self.n_classes)),
               "val_prior_log_loss": prior_log_loss(val_labels, val_labels, self.n_classes)}
        if probs is not None:
            out["oracle_log_loss"] = log_loss(probs, val_labels)
        return out


# ---- loading ------------------------------------------------------------------------------------
def load_training_data(files: DataFiles, split: SplitPolicy, cached: CachedFiles | None = None) -> TrainingData:
    """Read and split the training data (see the module docstring for which reader a file goes through).

    Raises the readers' `DataError` / `BadRowError` naming file, row and column.
    """
    if cached is not None and files.reads_plain_kaggle():
        data, rows_read = _load_cached(files, split, cached)
    elif files.train_path:
        return _load_adapted(files, split)
    else:
        data, rows_read = _load_synthetic(files, split)
    # one strictly read file: nothing skipped, no extra sources
    data.data_counts = {"train_file": {"path": files.source_name, "rows_read": rows_read, "skipped_bad_rows": 0,
                                       "train_rows": len(data.train_records), "val_rows": len(data.val_records),
                                       "class_prior": data.train_prior.round(6).tolist()}}
    log.info("%s: %d train rows, %d validation rows", files.source_name, len(data.train_records),
             len(data.val_records))
    return data


def _split_records(records: Sequence[PairRecord], split: SplitPolicy, n_classes: int) -> TrainingData:
    keys = [prompt_key(r) for r in records]
    train_idx, val_idx, folds = split.split(keys, label_array(records))
    return TrainingData([records[i] for i in train_idx], [records[i] for i in val_idx], n_classes,
                        row_ids=[r.id for r in records], folds=folds, train_file_keys=[keys[i] for i in train_idx])


def _load_cached(files: DataFiles, split: SplitPolicy, cached: CachedFiles) -> tuple[TrainingData, int]:
    """The split from the cached row table (prompt keys, labels): no JSON parsing on a cached run; and the
    training file's row count."""
    train = cached.get(files.train_path, True)
    rows = train.rows()
    if files.val_path:
        val = cached.get(files.val_path, True)
        train_rows = (train, np.arange(len(rows), dtype=np.int64))
        val_rows = (val, np.arange(len(val.rows()), dtype=np.int64))
        data = TrainingData([], [], files.n_classes)
    else:
        train_idx, val_idx, folds = split.split(rows.prompt_keys, rows.labels)
        train_rows = (train, np.asarray(train_idx, dtype=np.int64))
        val_rows = (train, np.asarray(val_idx, dtype=np.int64))
        data = TrainingData([], [], files.n_classes, row_ids=rows.ids, folds=folds,
                            train_file_keys=[rows.prompt_keys[i] for i in train_idx])
    data.train_rows, data.val_rows = train_rows, val_rows
    data.train_records = LazyRecords(train_rows[0].records, train_rows[1])
    data.val_records = LazyRecords(val_rows[0].records, val_rows[1])
    return data, len(rows)


def _load_synthetic(files: DataFiles, split: SplitPolicy) -> tuple[TrainingData, int]:
    """The embedded synthetic set, generated in memory (a val_path replaces its held-out split); and its
    row count."""
    records = records_from_frame(generate(files.synthetic_rows, seed=files.synthetic_seed).frame, files.source_name,
                                 require_labels=True)
    if files.val_path:
        val = read_source(files.val_path, files.train_format, require_labels=True, n_classes=files.n_classes,
                          seed=split.seed).records
        data = TrainingData(records, val, files.n_classes)
    else:
        data = _split_records(records, split, files.n_classes)
    return data, len(records)


def _load_adapted(files: DataFiles, split: SplitPolicy) -> TrainingData:
    """Train file through its adapter, split, then the extra sources added to the training split only."""
    def read(path: str):
        return read_source(path, files.train_format, require_labels=True, on_bad_rows=files.on_bad_rows,
                           n_classes=files.n_classes, seed=split.seed)

    source = read(files.train_path)
    records = source.records
    file_counts = {"path": str(files.train_path), "format": source.format, "rows_read": source.rows_read,
                   "skipped_bad_rows": len(source.skipped)}
    if files.val_path:
        val_source = read(files.val_path)
        data = TrainingData(list(records), val_source.records, files.n_classes)
        file_counts["val_file"] = {"path": str(files.val_path), "rows_read": val_source.rows_read,
                                   "skipped_bad_rows": len(val_source.skipped)}
        known = records + val_source.records
    else:
        data = _split_records(records, split, files.n_classes)
        known = records
    n_file = len(data.train_records)
    file_counts.update(train_rows=n_file, val_rows=len(data.val_records),
                       class_prior=class_prior(label_array(data.train_records), files.n_classes).round(6).tolist())
    pseudo_targets: list = []
    extra, source_counts = mix_sources(known, files.sources, prompt_key=prompt_key, seed=split.seed,
                                       on_bad_rows=files.on_bad_rows, n_classes=files.n_classes,
                                       targets=pseudo_targets)
    # pseudo-labelled sources' rows train on their teacher's probabilities alone (sources.py)
    data.pseudo_targets = [None] * n_file + pseudo_targets
    # the training file's rows can tie and weigh 1; each source's rows follow in order
    data.ties = np.concatenate([np.ones(n_file, bool)] + [np.full(c["added_to_train"], c["ties"])
                                                          for c in source_counts])
    data.loss_weights = np.concatenate([np.ones(n_file)] + [np.full(c["added_to_train"], c["loss_weight"])
                                                            for c in source_counts])
    # each row's source: 0 the training file, i + 1 the i-th extra source (its own head: model.source_heads)
    data.sources = np.concatenate([np.zeros(n_file, np.int64)] + [np.full(c["added_to_train"], i + 1, np.int64)
                                                                  for i, c in enumerate(source_counts)])
    data.n_sources = 1 + len(files.sources)
    data.train_records = data.train_records + extra
    data.data_counts = {"train_file": file_counts, "sources": source_counts,
                        "train_rows": len(data.train_records), "val_rows": len(data.val_records)}
    if files.sources:
        data.data_counts["totals"] = {
            key: sum(c[key] for c in source_counts)
            for key in ("rows_read", "skipped_bad_rows", "removed_prompt_in_train_file",
                        "removed_exact_duplicates", "kept", "added_to_train")
        }
    log.info("%s: %d train rows (%d from extra sources), %d validation rows", files.source_name,
             len(data.train_records), len(extra), len(data.val_records))
    return data
