"""LightningDataModule: records -> prompt-grouped train/validation split -> tokenized pairs -> batches.

A thin shell over values built elsewhere in `pref_lightning.data`: the records and their split
(`loading.load_training_data` -> `loading.TrainingData`), the encoded splits with the statistics' normalisation
fitted on the training split (`datasets.encode_splits`), the row targets (`targets.attach_row_targets`) and
the loaders (`loaders.pair_loader`). It keeps what Lightning asks a datamodule for (`prepare_data`, `setup`,
the loaders, the exact mid-epoch position in `state_dict`). Prediction does not use it (`loaders.predict_loader`).

The order is explicit: `load_records()` (returns the split records) -> `fit_spec(tokenizer)` (tokenizes, fits the
normalisation, returns the complete `EncodingSpec`) -> build the model with that spec -> fit. Reading `spec`
before `fit_spec` / `setup("fit")` raises (unless the normalisation was given, as a checkpoint's spec has it);
the settings before it are `encoding`.

With `cache_dir` set, a Kaggle-format data file's tokenized pairs (and what its split needs) are stored on disk by
`pref_lightning.data.cache` and reused by later runs: see `loading.CachedFile`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from pref_lightning.core.errors import UserError
from pref_lightning.data.cache import PairCache
from pref_lightning.data.collate import PairCollator
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datasets import PairDataset, encode_splits, predict_is_kaggle, predict_pairs
from pref_lightning.data.folds import prompt_key
from pref_lightning.data.loaders import EVAL_BUDGET_FACTOR, LoaderSettings, pair_loader, token_budget
from pref_lightning.data.loading import (
    CachedFile,
    CachedFiles,
    DataFiles,
    SplitPolicy,
    TrainingData,
    load_training_data,
)
from pref_lightning.data.pairs import PairEncoder
from pref_lightning.data.records import PairRecord, check_on_bad_rows
from pref_lightning.data.sampler import LengthGroupedSampler
from pref_lightning.data.sources import parse_sources
from pref_lightning.data.targets import TeacherSettings, attach_row_targets

__all__ = ["EVAL_BUDGET_FACTOR", "MAX_EPOCH_HORIZON", "CachedFile", "PairDataset", "PreferenceDataModule"]

MAX_EPOCH_HORIZON = 100  # token budgets: epochs over which the training batch count is made constant


class PreferenceDataModule(L.LightningDataModule):
    """Reads the training file (or generates the embedded synthetic set), splits, tokenizes, batches.

    The tokenizer comes in `fit_spec` / `attach_tokenizer` once it is known, because the tiny offline backbone
    trains its tokenizer on this module's training texts. `cache_dir` (None: no cache) keeps each Kaggle-format
    data file's tokenized pairs and split inputs on disk (`pref_lightning.data.cache`); a cached run parses no
    JSON and tokenizes nothing, and `train_records` / `val_records` are then `LazyRecords`.
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
        # the encoding settings (contract.EncodingSpec): a checkpoint's `spec`, with the data config's encoding
        # keys (max_length, layout, n_classes, ...) on top; complete (`spec`) once the statistics' normalisation
        # is fitted on the training split (fit_spec / setup("fit")) unless given
        base = spec.to_dict() if isinstance(spec, EncodingSpec) else dict(spec or {})
        self.encoding = EncodingSpec.from_dict({**base, **encoding}, where="data")
        self._spec: EncodingSpec | None = self.encoding if self.encoding.stats_norm is not None else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        # token budgets (sampler.py): padded tokens per batch instead of rows; evaluation keeps no
        # activations, so its default budget is EVAL_BUDGET_FACTOR times the training one
        self.max_tokens = token_budget(max_tokens, "data.max_tokens")
        self.eval_max_tokens = token_budget(eval_max_tokens, "data.eval_max_tokens") or (
            EVAL_BUDGET_FACTOR * self.max_tokens if self.max_tokens else None)
        self.loader_settings = LoaderSettings(num_workers, pad_to_multiple_of, length_grouped, mega_batch_mult,
                                              split_seed)
        self.cached = CachedFiles(PairCache(cache_dir)) if cache_dir else None
        # k-fold cross-validation: validation is fold `fold` of `n_folds` (None: a val_fraction split)
        self.n_folds = int(n_folds) if n_folds else None
        self.fold = int(fold)
        if self.n_folds and val_path:
            raise UserError("data.n_folds and data.val_path exclude each other: folds are cut from train_path")
        if not self.n_folds and self.fold != 0:  # a sweep over data.fold would train the same split each time
            raise UserError(f"data.fold={self.fold} needs data.n_folds (the number of folds, e.g. data.n_folds=5): "
                            "without it validation is the data.val_fraction split, the same for every data.fold")
        self.split = SplitPolicy(val_fraction, split_seed, self.n_folds, self.fold)
        # extra training files (pref_lightning.data.sources), the bad-row policy of training files, the task's
        # classes (2: A/B only, ties are bad rows) and the adapters of the train / predict files (None: detect)
        self.sources = parse_sources(sources)
        self.files = DataFiles(train_path, val_path, train_format, check_on_bad_rows(on_bad_rows),
                               self.encoding.n_classes, tuple(self.sources), synthetic_rows, synthetic_seed)
        self.predict_format = predict_format
        # soft targets of the training rows: a teacher's probabilities joined by id (targets.py)
        self.teacher = TeacherSettings(teacher_path, teacher_weight, teacher_temperature, teacher_missing)
        self.data: TrainingData | None = None
        self._train_sampler: LengthGroupedSampler | None = None
        self._resume_position: dict[str, int] | None = None  # set when a checkpoint is restored
        self.encoder: PairEncoder | None = None
        self.predict_records: list[PairRecord] | None = None
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.predict_set: PairDataset | None = None

    # ---- the complete spec ------------------------------------------------------------------------
    @property
    def spec(self) -> EncodingSpec:
        """The complete encoding spec, its statistics' normalisation fitted (what a model is built with).

        Raises RuntimeError before `fit_spec` / `setup("fit")` fitted it (a model built then would fail
        only at prediction); the settings before it are `encoding`."""
        if self._spec is None:
            raise RuntimeError("datamodule.spec is read before the statistics' normalisation is fitted: call "
                               "fit_spec(tokenizer) (or attach_tokenizer + setup('fit')) first; the settings "
                               "before it are datamodule.encoding")
        return self._spec

    def fit_spec(self, tokenizer) -> EncodingSpec:
        """Attach `tokenizer`, encode the splits and fit the statistics' normalisation on the training split:
        the complete spec to build the model with."""
        self.attach_tokenizer(tokenizer)
        self.setup("fit")
        return self.spec

    # ---- records -----------------------------------------------------------------------------------
    @property
    def source_name(self) -> str:
        return self.files.source_name

    def load_records(self) -> TrainingData:
        """Read and split the training data once (cheap to call again); see `loading.load_training_data`."""
        if self.data is None:
            self.data = load_training_data(self.files, self.split, self.cached)
        return self.data

    @property
    def train_records(self) -> Sequence[PairRecord] | None:
        return None if self.data is None else self.data.train_records

    @property
    def val_records(self) -> Sequence[PairRecord] | None:
        return None if self.data is None else self.data.val_records

    @property
    def data_counts(self) -> dict:
        """Rows read / skipped / deduplicated per file, the teacher's matches (into metrics.json)."""
        return {} if self.data is None else self.data.data_counts

    @property
    def folds(self) -> np.ndarray | None:
        return None if self.data is None else self.data.folds

    def fold_table(self) -> pd.DataFrame | None:
        return self.load_records().fold_table()

    @property
    def train_ids(self) -> list[str]:
        return self.load_records().train_ids

    @property
    def val_ids(self) -> list[str]:
        return self.load_records().val_ids

    @property
    def train_labels(self) -> np.ndarray:
        return self.load_records().train_labels

    @property
    def train_prior(self) -> np.ndarray:
        return self.load_records().train_prior

    def tokenizer_texts(self, max_rows: int = 20_000) -> list[str]:
        return self.load_records().tokenizer_texts(max_rows)

    def validation_reference(self) -> dict[str, float]:
        return self.load_records().validation_reference()

    # ---- tokenization ------------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer) -> None:
        self.encoder = PairEncoder(tokenizer, self.encoding)

    def _require_encoder(self) -> PairEncoder:
        if self.encoder is None:
            raise RuntimeError("attach_tokenizer() must be called before setup()")
        return self.encoder

    def prepare_data(self) -> None:
        """Build the cache of the training (and validation / prediction) files if it is missing.

        Lightning calls this once per node (local rank 0); `setup()` builds what is missing too. DDP ranks
        sharing a machine wait for one builder (file lock). Without `cache_dir`, or before a tokenizer is
        attached (the key needs it), there is nothing to do.
        """
        if self.cached is None or self.encoder is None:
            return
        files = []
        if self.files.reads_plain_kaggle():  # other formats are read through the adapters
            files += [self.cached.get(p, True) for p in (self.train_path, self.val_path) if p]
        if self.predict_path and predict_is_kaggle(self.predict_path, self.predict_format):
            files.append(self.cached.get(self.predict_path, False))
        for source in files:
            source.rows()
            if not source.has_pairs(self.encoder):
                source.pairs(self.encoder)  # builds, stores and keeps the table for setup()

    def setup(self, stage: str | None = None) -> None:
        encoder = self._require_encoder()
        if stage in (None, "fit", "validate") and self.train_set is None:
            data = self.load_records()
            self.train_set, self.val_set, stats_norm = encode_splits(data, encoder, self.encoding.stats_norm)
            # the data facts the model is built with: the fitted normalisation and the training sources
            self._spec = self.encoding.replace(stats_norm=stats_norm, n_sources=data.n_sources)
            for name, dataset in (("training", self.train_set), ("validation", self.val_set)):
                if not len(dataset):
                    raise UserError(f"{self.source_name}: no {name} rows")
            counts = attach_row_targets(self.train_set.pairs, data, self.teacher)
            if counts is not None:
                data.data_counts["teacher"] = counts
        if stage in (None, "predict") and self.predict_path and self.predict_set is None:
            self.predict_records, self.predict_set = predict_pairs(
                self.predict_path, encoder, None if self._spec is None else self._spec.stats_norm,
                input_format=self.predict_format, cached=self.cached)

    def collator(self) -> PairCollator:
        """The collator of this datamodule's loaders (encoded pairs -> a padded batch dict)."""
        return PairCollator(self._require_encoder().pad_id, self.loader_settings.pad_to_multiple_of)

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
        if self.data.ties is not None:
            ties = np.array([p.ties for p in pairs])
            weight = np.array([p.weight for p in pairs])
        if rows == "train_file" and self.sources:
            n = len(pairs) - sum(c["added_to_train"] for c in self.data_counts["sources"])
            ties = weight = None  # the training file's rows all can tie and weigh 1
        keys = self.data.train_file_keys
        if keys is None or len(keys) != n:  # an explicit val_path (no split), or every row with the sources'
            keys = [prompt_key(r) for r in self.train_records[:n]]
        return {"pairs": pairs[:n], "stats_a": stats_a[:n], "stats_b": stats_b[:n], "labels": labels[:n],
                "ties": None if ties is None else ties[:n], "weight": None if weight is None else weight[:n],
                "groups": list(keys[:n]), "n_classes": self.spec.n_classes}

    # ---- loaders ----------------------------------------------------------------------------------
    def _loader(self, dataset: PairDataset, batch_size: int, shuffle: bool, max_tokens: int | None) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epochs = getattr(trainer, "max_epochs", None)
        epochs = min(int(epochs), MAX_EPOCH_HORIZON) if epochs and epochs > 0 else 1
        return pair_loader(dataset, self._require_encoder().pad_id, self.encoding.layout, batch_size, shuffle,
                           max_tokens, self.loader_settings, replicas=replicas, rank=rank, epochs=epochs,
                           position=self.train_position, resume=self.load_train_position,
                           on_sampler=self._set_train_sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True, max_tokens=self.max_tokens)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False, max_tokens=self.eval_max_tokens)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.eval_batch_size, shuffle=False, max_tokens=self.eval_max_tokens)

    # ---- exact mid-epoch resume -------------------------------------------------------------------
    def _set_train_sampler(self, sampler: LengthGroupedSampler) -> None:
        self._train_sampler = sampler
        if self._resume_position is not None:
            self._apply_resume_position()

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
