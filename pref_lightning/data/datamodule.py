"""LightningDataModule: records -> prompt-grouped train/validation split -> tokenized pairs -> batches.

With `cache_dir` set, a data file's tokenized pairs (and what its split needs) are stored on disk by
`pref_lightning.data.cache` and reused by later runs: see `PreferenceDataModule.prepare_data`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, DistributedSampler

from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import class_prior, log_loss, prior_log_loss
from pref_lightning.data.adapters import read_any, read_source, sniff_format
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
from pref_lightning.data.collate import PairCollator
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.folds import assign_folds, fold_split, grouped_split_keys, prompt_key
from pref_lightning.data.pairs import EncodedPair, PairEncoder
from pref_lightning.data.records import (
    PairRecord,
    check_on_bad_rows,
    label_array,
    read_records,
    records_from_frame,
)
from pref_lightning.data.sampler import LengthGroupedSampler, ResumableLoader, padded_row
from pref_lightning.data.sources import mix_sources, parse_sources
from pref_lightning.data.stats_norm import apply_stats_norm, fit_stats_norm_array
from pref_lightning.data.synthetic import generate

log = logging.getLogger(__name__)
EVAL_BUDGET_FACTOR = 4  # default eval_max_tokens = 4 * max_tokens: no activations are kept for backward
MAX_EPOCH_HORIZON = 100  # token budgets: epochs over which the training batch count is made constant


def fit_stats_norm(pairs: Sequence[EncodedPair]) -> dict[str, Any]:
    """The bounded normalisation (see `stats_norm.py`) of both sides of the training pairs."""
    return fit_stats_norm_array(np.stack([p.stats_a for p in pairs] + [p.stats_b for p in pairs]))


def fit_stats_norm_table(table: EncodedTable, rows: np.ndarray) -> dict[str, Any]:
    """`fit_stats_norm` of the pairs at `rows` of an encoded table (same numbers, no per-pair objects)."""
    return fit_stats_norm_array(np.concatenate([table.stats_a[rows], table.stats_b[rows]]))


def normalise_stats(pairs: list[EncodedPair], norm: dict[str, Any]) -> list[EncodedPair]:
    for pair in pairs:
        pair.stats_a = apply_stats_norm(pair.stats_a, norm)
        pair.stats_b = apply_stats_norm(pair.stats_b, norm)
    return pairs


class PairDataset:
    """A list of encoded pairs; a plain sequence is all a DataLoader needs.

    A negative index is the sampler's padding copy of a row (`sampler.padding_index`), marked as such.
    """

    def __init__(self, pairs: list[EncodedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> EncodedPair:
        if i < 0:
            return dataclasses.replace(self.pairs[padded_row(i)], padding=True)
        return self.pairs[i]


class CachedFile:
    """One data file served through a `PairCache`: its row table (split inputs), its records (parsed
    only when asked for) and its encoded pairs (per encoder settings), each computed at most once."""

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
        import time

        records = self.records()
        if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off"):
            log.warning("TOKENIZERS_PARALLELISM=%s: the fast tokenizer runs on one thread",
                        os.environ["TOKENIZERS_PARALLELISM"])
        started = time.perf_counter()
        table = encode_table(encoder, records)
        log.info("%s: tokenized %d rows in %.1f s (cached in %s)", self.path, len(records),
                 time.perf_counter() - started, self.cache.folder)
        return table


class PreferenceDataModule(L.LightningDataModule):
    """Reads the training file (or generates the embedded synthetic set), splits, tokenizes, batches.

    The tokenizer is attached by the pipeline (`attach_tokenizer`) once it is known, because the tiny
    offline backbone trains its tokenizer on this module's training texts.

    `cache_dir` (None: no cache) keeps each data file's tokenized pairs and split inputs on disk
    (`pref_lightning.data.cache`), keyed by the file's content, the tokenizer and the encoding settings.
    `prepare_data()` builds what is missing; `setup()` loads it (building it first if needed), selects
    the split's rows and normalises the statistics per split. A cached run parses no JSON and
    tokenizes nothing; `train_records` / `val_records` are then `LazyRecords` that parse the file only
    if a record itself is read. The embedded synthetic set is generated in memory and never cached.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        predict_path: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_tokens: int | None = None,
        eval_max_tokens: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        synthetic_rows: int = 10_000,
        synthetic_seed: int = 0,
        split_seed: int = 42,
        length_grouped: bool = True,
        mega_batch_mult: int = 50,
        cache_dir: str | None = None,
        n_folds: int | None = None,
        fold: int = 0,
        sources: Sequence[object] | None = None,
        on_bad_rows: str = "raise",
        train_format: str | None = None,
        predict_format: str | None = None,
        teacher_path: str | None = None,
        teacher_weight: float = 0.5,
        teacher_temperature: float = 1.0,
        teacher_missing: str = "error",
        spec: EncodingSpec | Mapping[str, Any] | None = None,
        **encoding: Any,
    ) -> None:
        super().__init__()
        self.train_path = train_path
        self.val_path = val_path  # an explicit validation file replaces the held-out split
        self.predict_path = predict_path
        self.val_fraction = val_fraction
        # the encoding contract (contract.EncodingSpec): a checkpoint's `spec` (prediction), with the data
        # config's encoding keys (max_length, layout, n_classes, ...) on top; the statistics' normalisation
        # is fitted on the training split in setup("fit") unless given
        base = spec.to_dict() if isinstance(spec, EncodingSpec) else dict(spec or {})
        self.spec = EncodingSpec.from_dict({**base, **encoding}, where="data")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        # token budgets (sampler.py): padded tokens per batch instead of rows; evaluation keeps no
        # activations, so its default budget is EVAL_BUDGET_FACTOR times the training one
        for key, value in (("max_tokens", max_tokens), ("eval_max_tokens", eval_max_tokens)):
            if value is not None and int(value) < 1:
                raise UserError(f"data.{key}={value} must be a positive number of tokens (or null: use batch sizes)")
        self.max_tokens = int(max_tokens) if max_tokens else None
        self.eval_max_tokens = int(eval_max_tokens) if eval_max_tokens else (
            EVAL_BUDGET_FACTOR * self.max_tokens if self.max_tokens else None)
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.synthetic_rows = synthetic_rows
        self.synthetic_seed = synthetic_seed
        self.split_seed = split_seed
        # batches of similar length (training: shuffled within mega-batches; evaluation: sorted)
        self.length_grouped = length_grouped
        self.mega_batch_mult = mega_batch_mult
        self._cache = PairCache(cache_dir) if cache_dir else None  # tokenized pairs per data file (None: none)
        # k-fold cross-validation: validation is fold `fold` of `n_folds` (None: a val_fraction split)
        self.n_folds = int(n_folds) if n_folds else None
        self.fold = int(fold)
        if self.n_folds and val_path:
            raise UserError("data.n_folds and data.val_path exclude each other: folds are cut from train_path")
        if not self.n_folds and self.fold != 0:  # a sweep over data.fold would train the same split each time
            raise UserError(f"data.fold={self.fold} needs data.n_folds (the number of folds, e.g. data.n_folds=5): "
                            "without it validation is the data.val_fraction split, the same for every data.fold")
        self.folds: np.ndarray | None = None  # fold of every row of the training file
        self._row_ids: list[str] | None = None  # ids of the training file's rows (fold files)
        # extra training files (pref_lightning.data.sources), the bad-row policy of training files, the task's
        # classes (2: A/B only, ties are bad rows) and the adapters of the train / predict files (None: detect)
        self.sources = parse_sources(sources)
        self.on_bad_rows = check_on_bad_rows(on_bad_rows)
        self.train_format = train_format
        self.predict_format = predict_format
        self.data_counts: dict = {}  # rows read / skipped / deduplicated per file (into metrics.json)
        # soft targets of the training rows: a teacher's probabilities joined by id (pref_lightning.data.teacher),
        # mixed with the hard label by teacher_weight; rows the file lacks: an error, or hard labels only
        from pref_lightning.core.losses import TEACHER_MISSING

        if teacher_missing not in TEACHER_MISSING:
            raise UserError(f"data.teacher_missing={teacher_missing!r}; choose from {', '.join(TEACHER_MISSING)}")
        if not 0.0 <= teacher_weight <= 1.0:
            raise UserError(f"data.teacher_weight={teacher_weight} must lie in [0, 1]")
        if not teacher_temperature > 0:
            raise UserError(f"data.teacher_temperature={teacher_temperature} must be > 0")
        self.teacher_path = teacher_path
        self.teacher_weight = float(teacher_weight)
        self.teacher_temperature = float(teacher_temperature)
        self.teacher_missing = teacher_missing
        # per training row (train_records order): may its source say "tie", its loss weight (None: all
        # True / 1, as for a training file without extra sources); see losses.py
        self._train_ties: np.ndarray | None = None
        self._train_file_keys: list[str] | None = None  # prompt keys of the training file's training rows
        self._train_loss_weights: np.ndarray | None = None
        self._targets_attached = False
        self._files: dict[tuple[str, bool], CachedFile] = {}
        # with the cache: (file, row positions) of each split
        self._train_rows: tuple[CachedFile, np.ndarray] | None = None
        self._val_rows: tuple[CachedFile, np.ndarray] | None = None
        self._train_sampler: LengthGroupedSampler | None = None
        self._resume_position: dict[str, int] | None = None  # set when a checkpoint is restored
        self.encoder: PairEncoder | None = None
        self.train_records: list[PairRecord] | None = None
        self.val_records: list[PairRecord] | None = None
        self.predict_records: list[PairRecord] | None = None
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.predict_set: PairDataset | None = None

    # ---- records -------------------------------------------------------------------------------
    @property
    def source_name(self) -> str:
        if self.train_path:
            return str(self.train_path)
        return f"synthetic(rows={self.synthetic_rows}, seed={self.synthetic_seed})"

    def _cached_file(self, path: str | Path, require_labels: bool) -> CachedFile:
        key = (str(path), require_labels)
        if key not in self._files:
            self._files[key] = CachedFile(path, require_labels, self._cache)
        return self._files[key]

    def _load_records_cached(self) -> None:
        """The split from the cached row table (prompt keys, labels): no JSON parsing on a cached run."""
        train = self._cached_file(self.train_path, True)
        n_rows = len(train.rows())
        if self.val_path:
            val = self._cached_file(self.val_path, True)
            self._train_rows = (train, np.arange(n_rows, dtype=np.int64))
            self._val_rows = (val, np.arange(len(val.rows()), dtype=np.int64))
        else:
            rows = train.rows()
            self._row_ids = rows.ids
            train_idx, val_idx = self._split(rows.prompt_keys, rows.labels)
            self._train_rows = (train, np.asarray(train_idx, dtype=np.int64))
            self._val_rows = (train, np.asarray(val_idx, dtype=np.int64))
        self.train_records = LazyRecords(self._train_rows[0].records, self._train_rows[1])
        self.val_records = LazyRecords(self._val_rows[0].records, self._val_rows[1])

    def load_records(self) -> None:
        """Read and split the training data once (cheap to call again)."""
        if self.train_records is not None:
            return
        if self.train_path and self._cache is not None and not self._uses_adapters:
            self._load_records_cached()
            self._count_plain_file(len(self._train_rows[0].rows()))
            log.info("%s: %d train rows, %d validation rows", self.source_name, len(self.train_records),
                     len(self.val_records))
            return
        if self.train_path:  # every other file, format and policy: through the adapters
            self._load_records_adapted()
            return
        # the embedded synthetic set, generated in memory (a val_path replaces its held-out split)
        records = records_from_frame(generate(self.synthetic_rows, seed=self.synthetic_seed).frame, self.source_name,
                                     require_labels=True)
        if self.val_path:
            self.train_records = records
            self.val_records = read_source(self.val_path, self.train_format, require_labels=True,
                                           n_classes=self.spec.n_classes, seed=self.split_seed).records
        else:
            self._row_ids = [r.id for r in records]
            train_idx, val_idx = self._split([prompt_key(r) for r in records], label_array(records))
            self.train_records = [records[i] for i in train_idx]
            self.val_records = [records[i] for i in val_idx]
        self._count_plain_file(len(records))
        log.info("%s: %d train rows, %d validation rows", self.source_name, len(self.train_records),
                 len(self.val_records))

    def _count_plain_file(self, rows_read: int) -> None:
        """`data_counts` of a run on one strictly read file (nothing skipped, no extra sources)."""
        self.data_counts = {"train_file": {"path": self.source_name, "rows_read": rows_read, "skipped_bad_rows": 0,
                                           "train_rows": len(self.train_records), "val_rows": len(self.val_records),
                                           "class_prior": self.train_prior.round(6).tolist()}}

    def _split(self, keys: Sequence[str], labels: np.ndarray) -> tuple[list[int], list[int]]:
        """(train, validation) row indices of the training file: fold `fold`, or a val_fraction split."""
        if not self.n_folds:
            train, val = grouped_split_keys(keys, self.val_fraction, self.split_seed)
        else:
            self.folds = assign_folds(keys, labels, self.n_folds, self.split_seed)
            train, val = fold_split(self.folds, self.fold)
        self._train_file_keys = [keys[i] for i in train]  # the anchor's inner CV groups by prompt
        return train, val

    def fold_table(self) -> pd.DataFrame | None:
        """id and fold of every row of the training file (k-fold runs only; written as RUN/folds.csv)."""
        self.load_records()
        if self.folds is None:
            return None
        return pd.DataFrame({"id": self._row_ids, "fold": self.folds})

    @staticmethod
    def _split_ids(cached: tuple[CachedFile, np.ndarray] | None, records: Sequence[PairRecord]) -> list[str]:
        """Row ids of a split: from the cached row table when the split came from it (no JSON parsing),
        else from its records."""
        if cached is not None:
            source, rows = cached
            ids = source.rows().ids
            if ids is not None:
                return [ids[i] for i in rows]
        return [r.id for r in records]

    @property
    def val_ids(self) -> list[str]:
        """Row ids of the validation split, in validation order."""
        self.load_records()
        return self._split_ids(self._val_rows, self.val_records)

    @property
    def _uses_adapters(self) -> bool:
        """Anything beyond one Kaggle-format file read strictly: read through `pref_lightning.data.adapters`
        (the on-disk cache serves only the plain case)."""
        if self.sources or self.on_bad_rows != "raise" or self.spec.n_classes != 3:
            return True
        if self.train_format is None:
            return any(sniff_format(p) != "kaggle" for p in (self.train_path, self.val_path) if p)
        return self.train_format != "kaggle"

    @property
    def _predict_is_kaggle(self) -> bool:
        """The prediction file is Kaggle format (the only format the on-disk cache reads)."""
        if self.predict_format is not None:
            return self.predict_format == "kaggle"
        return Path(self.predict_path).is_file() and sniff_format(self.predict_path) == "kaggle"

    def _load_records_adapted(self) -> None:
        """Train file through its adapter, split, then the extra sources added to the training split only."""
        def read(path: str):
            return read_source(path, self.train_format, require_labels=True, on_bad_rows=self.on_bad_rows,
                               n_classes=self.spec.n_classes, seed=self.split_seed)

        data = read(self.train_path)
        records = data.records
        file_counts = {"path": str(self.train_path), "format": data.format, "rows_read": data.rows_read,
                       "skipped_bad_rows": len(data.skipped)}
        if self.val_path:
            val_data = read(self.val_path)
            self.train_records, self.val_records = list(records), val_data.records
            file_counts["val_file"] = {"path": str(self.val_path), "rows_read": val_data.rows_read,
                                       "skipped_bad_rows": len(val_data.skipped)}
            known = records + val_data.records
        else:
            self._row_ids = [r.id for r in records]
            train_idx, val_idx = self._split([prompt_key(r) for r in records], label_array(records))
            self.train_records = [records[i] for i in train_idx]
            self.val_records = [records[i] for i in val_idx]
            known = records
        file_counts.update(train_rows=len(self.train_records), val_rows=len(self.val_records),
                           class_prior=class_prior(label_array(self.train_records), self.spec.n_classes).round(6).tolist())
        pseudo_targets: list = []
        extra, source_counts = mix_sources(known, self.sources, prompt_key=prompt_key, seed=self.split_seed,
                                           on_bad_rows=self.on_bad_rows, n_classes=self.spec.n_classes,
                                           targets=pseudo_targets)
        # pseudo-labelled sources' rows train on their teacher's probabilities alone (sources.py)
        self._pseudo_targets = [None] * len(self.train_records) + pseudo_targets
        # the training file's rows can tie and weigh 1; each source's rows follow in order
        self._train_ties = np.concatenate([np.ones(len(self.train_records), bool)]
                                          + [np.full(c["added_to_train"], c["ties"]) for c in source_counts])
        self._train_loss_weights = np.concatenate([np.ones(len(self.train_records))]
                                                  + [np.full(c["added_to_train"], c["loss_weight"])
                                                     for c in source_counts])
        self.train_records = self.train_records + extra
        self.data_counts = {"train_file": file_counts, "sources": source_counts,
                            "train_rows": len(self.train_records), "val_rows": len(self.val_records)}
        if self.sources:
            self.data_counts["totals"] = {
                key: sum(c[key] for c in source_counts)
                for key in ("rows_read", "skipped_bad_rows", "removed_prompt_in_train_file",
                            "removed_exact_duplicates", "kept", "added_to_train")
            }
        log.info("%s: %d train rows (%d from extra sources), %d validation rows", self.source_name,
                 len(self.train_records), len(extra), len(self.val_records))

    def tokenizer_texts(self, max_rows: int = 20_000) -> list[str]:
        """Training texts to fit an offline tokenizer on (validation rows excluded)."""
        self.load_records()
        texts = []
        for record in self.train_records[:max_rows]:
            texts.extend(record.prompt)
            texts.extend(record.response_a)
            texts.extend(record.response_b)
        return texts

    @property
    def train_labels(self) -> np.ndarray:
        self.load_records()
        if self._train_rows is not None:
            source, rows = self._train_rows
            return source.rows().labels[rows]
        return label_array(self.train_records)

    @property
    def train_prior(self) -> np.ndarray:
        """Class frequencies (K,) of the training split. With tie-less rows (`ties` False), the prior the
        tie-aware loss fits: P(tie) from the rows that can tie, P(A) : P(B) from every row."""
        labels = self.train_labels
        ties = self._train_ties
        if ties is None or ties.all() or self.spec.n_classes < 3 or not ties.any():
            return class_prior(labels, self.spec.n_classes)
        p_tie = float((labels[ties] == 2).mean())
        wins = np.bincount(labels[labels < 2], minlength=2).astype(np.float64)
        return np.array([*(1.0 - p_tie) * wins / max(wins.sum(), 1.0), p_tie])

    @property
    def train_ids(self) -> list[str]:
        """Row ids of the training split, in training order (extra sources' rows last)."""
        self.load_records()
        return self._split_ids(self._train_rows, self.train_records)

    def _attach_row_targets(self, pairs: list[EncodedPair]) -> None:
        """Per training pair: its `ties` flag and loss `weight` (extra sources), and its target probabilities
        (a teacher: `teacher_path`) or, without a teacher, none (the hard label)."""
        if self._train_ties is not None:
            for pair, ties, weight in zip(pairs, self._train_ties, self._train_loss_weights):
                pair.ties, pair.weight = bool(ties), float(weight)
        pseudo = getattr(self, "_pseudo_targets", None) or []
        if not self.teacher_path:
            if any(t is not None for t in pseudo):
                # a batch holds targets for every row or for none: a labelled row's target is its one-hot label
                # (the same cross-entropy as the hard label)
                eye = np.eye(self.spec.n_classes, dtype=np.float32)
                for i, pair in enumerate(pairs):
                    target = pseudo[i] if i < len(pseudo) else None
                    pair.target = target if target is not None else eye[pair.label]
            return
        from pref_lightning.core.losses import mix_targets
        from pref_lightning.data.teacher import read_teacher

        soft, counts = read_teacher(self.teacher_path, self.train_ids, self.spec.n_classes, self.teacher_temperature,
                                    self.teacher_missing)
        labels = np.array([p.label for p in pairs], dtype=np.int64)
        ties = np.array([p.ties for p in pairs], dtype=bool)
        for pair, target in zip(pairs, mix_targets(labels, soft, self.teacher_weight, ties)):
            pair.target = target
        for pair, target in zip(pairs, pseudo):  # a pseudo-labelled row keeps its own source's teacher
            if target is not None:
                pair.target = target
        self.data_counts["teacher"] = {**counts, "weight": self.teacher_weight, "missing": self.teacher_missing}
        log.info("teacher %s: %d of %d training rows matched by id (weight %g, temperature %g)", self.teacher_path,
                 counts["training_rows_matched"], len(pairs), self.teacher_weight, self.teacher_temperature)

    def validation_reference(self) -> dict[str, float]:
        """Log losses to judge the model by on the validation split: the train prior and the oracle."""
        self.load_records()
        if self._val_rows is not None:
            source, rows = self._val_rows
            val_labels = source.rows().labels[rows]
            oracle = source.rows().oracle
            probs = None if oracle is None else oracle[rows]
        else:
            val_labels = label_array(self.val_records)
            probs = None
            if all(r.oracle is not None for r in self.val_records):
                probs = np.array([r.oracle for r in self.val_records], dtype=np.float64)
        # references, all scored on the validation rows: the train split's class prior, uniform, and the
        # validation rows' own class frequencies (the best constant prediction; an optimistic reference)
        # (train_prior: with tie-less extra rows, the tie-aware prior; else the plain class frequencies)
        prior = np.broadcast_to(self.train_prior, (len(val_labels), self.spec.n_classes))
        out = {"prior_log_loss": log_loss(prior, val_labels),
               "uniform_log_loss": float(np.log(self.spec.n_classes)),
               "val_prior_log_loss": prior_log_loss(val_labels, val_labels, self.spec.n_classes)}
        if probs is not None:
            out["oracle_log_loss"] = log_loss(probs, val_labels)
        return out

    # ---- tokenization -------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer) -> None:
        self.encoder = PairEncoder(tokenizer, self.spec)

    def _require_encoder(self) -> PairEncoder:
        if self.encoder is None:
            raise RuntimeError("attach_tokenizer() must be called before setup()")
        return self.encoder

    def _cached_files_to_prepare(self) -> list[CachedFile]:
        files = []
        if self.train_path and not self._uses_adapters:  # other formats are read through the adapters
            files.append(self._cached_file(self.train_path, True))
            if self.val_path:
                files.append(self._cached_file(self.val_path, True))
        if self.predict_path and self._predict_is_kaggle:
            files.append(self._cached_file(self.predict_path, False))
        return files

    def prepare_data(self) -> None:
        """Build the cache of the training (and validation / prediction) files if it is missing.

        Lightning calls this once per node (local rank 0); `setup()` calls it too when the cache is
        missing, so the pipeline's explicit `setup("fit")` before `trainer.fit` uses the cache. DDP ranks
        sharing a machine wait for one builder (file lock). Without `cache_dir`, or before a tokenizer is
        attached (the key needs it), there is nothing to do.
        """
        if self._cache is None or self.encoder is None:
            return
        for source in self._cached_files_to_prepare():
            source.rows()
            if not source.has_pairs(self.encoder):
                source.pairs(self.encoder)  # builds, stores and keeps the table for setup()

    def _setup_fit_cached(self, encoder: PairEncoder) -> None:
        (train, train_rows), (val, val_rows) = self._train_rows, self._val_rows
        if not (train.has_pairs(encoder) and val.has_pairs(encoder)):
            self.prepare_data()
        train_table = train.pairs(encoder)
        if self.spec.stats_norm is None:
            self.spec = self.spec.replace(stats_norm=fit_stats_norm_table(train_table, train_rows))
        self.train_set = PairDataset(train_table.select(train_rows, self.spec.stats_norm))
        self.val_set = PairDataset(val.pairs(encoder).select(val_rows, self.spec.stats_norm))

    def setup(self, stage: str | None = None) -> None:
        encoder = self._require_encoder()
        if stage in (None, "fit", "validate"):
            self.load_records()
            if self.train_set is None and self._train_rows is not None:
                self._setup_fit_cached(encoder)
            if self.train_set is None:
                train_pairs = encoder.encode(self.train_records)
                if self.spec.stats_norm is None:
                    self.spec = self.spec.replace(stats_norm=fit_stats_norm(train_pairs))
                self.train_set = PairDataset(normalise_stats(train_pairs, self.spec.stats_norm))
                self.val_set = PairDataset(normalise_stats(encoder.encode(self.val_records), self.spec.stats_norm))
            for name, dataset in (("training", self.train_set), ("validation", self.val_set)):
                if not len(dataset):
                    raise UserError(f"{self.source_name}: no {name} rows")
            if not self._targets_attached:
                self._attach_row_targets(self.train_set.pairs)
                self._targets_attached = True
        if stage in (None, "predict") and self.predict_path and self.predict_set is None:
            if self.spec.stats_norm is None:
                raise RuntimeError("prediction needs stats_norm (it travels in the checkpoint)")
            if self._cache is not None and self._predict_is_kaggle:
                source = self._cached_file(self.predict_path, False)
                self.predict_records = source.records()  # ids are needed for the submission anyway
                if not source.has_pairs(encoder):
                    self.prepare_data()
                rows = np.arange(len(self.predict_records), dtype=np.int64)
                self.predict_set = PairDataset(source.pairs(encoder).select(rows, self.spec.stats_norm))
            else:
                # any supported format (detected unless predict_format is set); every row, in file order
                self.predict_records = read_any(self.predict_path, self.predict_format)
                self.predict_set = PairDataset(normalise_stats(encoder.encode(self.predict_records), self.spec.stats_norm))
            if not len(self.predict_set):
                raise UserError(f"{self.predict_path}: no rows to predict")

    def collator(self) -> PairCollator:
        """The collator of this datamodule's loaders (encoded pairs -> a padded batch dict)."""
        return PairCollator(self._require_encoder().pad_id, self.pad_to_multiple_of)

    def split_statistics(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised statistics of sides A and B (n, n_stats) and labels (n,) of the `train` or `val` split."""
        pairs = (self.train_set if split == "train" else self.val_set).pairs
        return (np.stack([p.stats_a for p in pairs]), np.stack([p.stats_b for p in pairs]),
                np.array([p.label for p in pairs], dtype=np.int64))

    def anchor_rows(self, rows: str = "train_file") -> dict[str, Any]:
        """The training rows the statistics anchor is fitted on (`model.anchor.fit_anchor_on`), after `setup`:
        the training split's rows of the training file (`rows="train_file"`: the distribution validation and
        test rows come from; on the arena folds, adding the extra sets' rows costs 0.02 nats OOF) or every
        training row (`all`, with the network's tie-aware weights). Returns `pairs` (the encoded pairs),
        `stats_a`, `stats_b` (n, n_stats) normalised statistics, `labels` (n,), `ties` and `weight` (n, ...) or
        None, and `groups` (n prompt keys, for CV grouped by prompt). Raises UserError for another `rows`."""
        if rows not in ("train_file", "all"):
            raise UserError(f"model.anchor_rows={rows!r}; choose train_file or all")
        stats_a, stats_b, labels = self.split_statistics("train")
        pairs = self.train_set.pairs
        n = len(pairs)
        ties = weight = None
        if self._train_ties is not None:
            ties = np.array([p.ties for p in pairs])
            weight = np.array([p.weight for p in pairs])
        if rows == "train_file" and self.sources:
            n = len(pairs) - sum(c["added_to_train"] for c in self.data_counts["sources"])
            ties = weight = None  # the training file's rows all can tie and weigh 1
        keys = self._train_file_keys
        if keys is None or len(keys) != n:  # an explicit val_path (no split), or every row with the sources'
            keys = [prompt_key(r) for r in self.train_records[:n]]
        return {"pairs": pairs[:n], "stats_a": stats_a[:n], "stats_b": stats_b[:n], "labels": labels[:n],
                "ties": None if ties is None else ties[:n], "weight": None if weight is None else weight[:n],
                "groups": list(keys[:n]), "n_classes": self.spec.n_classes}


    # ---- loaders ------------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _epochs(self) -> int:
        """Epochs the trainer will run (for a constant batch count under token budgets), capped."""
        epochs = getattr(getattr(self, "trainer", None), "max_epochs", None)
        return min(int(epochs), MAX_EPOCH_HORIZON) if epochs and epochs > 0 else 1

    def _loader(self, dataset: PairDataset, batch_size: int, shuffle: bool, max_tokens: int | None = None) -> DataLoader:
        """Training (`shuffle`) or evaluation loader of `batch_size` rows or `max_tokens` padded tokens per batch."""
        collate = PairCollator(self.encoder.pad_id, self.pad_to_multiple_of)
        common = {"num_workers": self.num_workers, "collate_fn": collate,
                  "persistent_workers": self.num_workers > 0}
        replicas, rank = self._replicas()
        if not self.length_grouped and shuffle and max_tokens is None:
            # the trainer runs with use_distributed_sampler=false, so sharding is done here
            sampler = DistributedSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.split_seed) \
                if replicas > 1 else None
            return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                              sampler=sampler, **common)
        # evaluation without length grouping: equal lengths keep the input order, rows dealt out as below
        # (token budgets need the lengths whatever length_grouped says)
        lengths = [len(p) for p in dataset.pairs] if self.length_grouped or max_tokens else [0] * len(dataset)
        if max_tokens and self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            lengths = [-(-n // m) * m for n in lengths]
        sampler = LengthGroupedSampler(lengths, batch_size, shuffle=shuffle,
                                       mega_batch_mult=self.mega_batch_mult, seed=self.split_seed,
                                       num_replicas=replicas, rank=rank, max_tokens=max_tokens,
                                       # backbone sequences per row: siamese 2; cross 1 in training (one
                                       # order per pair), 2 in evaluation (swap TTA runs both orders)
                                       sequences_per_row=2 if self.spec.layout == "siamese" or not shuffle else 1,
                                       epochs=self._epochs())
        if not shuffle:
            return DataLoader(dataset, batch_sampler=sampler, **common)
        self._train_sampler = sampler
        if self._resume_position is not None:
            self._apply_resume_position()
        return ResumableLoader(dataset, batch_sampler=sampler, position=self.train_position,
                               resume=self.load_train_position, **common)

    # ---- exact mid-epoch resume ---------------------------------------------------------------
    def train_position(self) -> dict[str, int]:
        """(epoch, training batches of it already stepped on), from the trainer's loop progress: the
        loader's own iterator runs ahead by its prefetched batches."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        return {"epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_train_position(self, position: dict[str, int]) -> None:
        self._resume_position = dict(position)
        if self._train_sampler is not None:
            self._apply_resume_position()

    def _apply_resume_position(self) -> None:
        position, self._resume_position = self._resume_position, None
        self._train_sampler.resume_at(int(position["epoch"]), int(position["batches"]))

    def state_dict(self) -> dict[str, Any]:
        # saved in every checkpoint; Lightning restores it before building the training loader
        return {"train_position": self.train_position()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self.load_train_position(state_dict["train_position"])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True, max_tokens=self.max_tokens)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False, max_tokens=self.eval_max_tokens)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.eval_batch_size, shuffle=False, max_tokens=self.eval_max_tokens)
