"""Encoded pairs as datasets: the training and validation splits (with the statistics' normalisation fitted on
the training split) and the rows of a file to predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pref_lightning.core.errors import UserError
from pref_lightning.data.adapters import read_any, sniff_format
from pref_lightning.data.loading import CachedFiles, TrainingData
from pref_lightning.data.pairs import EncodedPair, PairEncoder
from pref_lightning.data.records import PairRecord
from pref_lightning.data.sampler import padded_row
from pref_lightning.data.stats_norm import fit_stats_norm, fit_stats_norm_table, normalise_stats


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


def encode_splits(data: TrainingData, encoder: PairEncoder,
                  stats_norm: dict[str, Any] | None = None) -> tuple[PairDataset, PairDataset, dict[str, Any]]:
    """(training set, validation set, the statistics' normalisation): `data`'s splits encoded with `encoder`,
    their statistics normalised with `stats_norm`, or (None) with the normalisation fitted here on the training
    split. A split that came from the cache (`data.train_rows`) is served from its file's encoded table (built
    and stored if missing); the numbers are the same either way."""
    if data.train_rows is not None:
        (train, train_rows), (val, val_rows) = data.train_rows, data.val_rows
        table = train.pairs(encoder)
        norm = stats_norm if stats_norm is not None else fit_stats_norm_table(table, train_rows)
        return (PairDataset(table.select(train_rows, norm)), PairDataset(val.pairs(encoder).select(val_rows, norm)),
                norm)
    train_pairs = encoder.encode(data.train_records)
    norm = stats_norm if stats_norm is not None else fit_stats_norm(train_pairs)
    return (PairDataset(normalise_stats(train_pairs, norm)),
            PairDataset(normalise_stats(encoder.encode(data.val_records), norm)), norm)


def predict_is_kaggle(path: str | Path, input_format: str | None) -> bool:
    """The prediction file is Kaggle format (the only format the on-disk cache reads)."""
    if input_format is not None:
        return input_format == "kaggle"
    return Path(path).is_file() and sniff_format(path) == "kaggle"


def predict_pairs(path: str | Path, encoder: PairEncoder, stats_norm: dict[str, Any] | None, *,
                  input_format: str | None = None,
                  cached: CachedFiles | None = None) -> tuple[list[PairRecord], PairDataset]:
    """(records, encoded pairs) of every row of the file to predict, in file order, statistics normalised with
    the checkpoint's `stats_norm`; a Kaggle-format file through the cache when `cached` is given, any other
    through its adapter (`input_format` None: detected).

    Raises RuntimeError without `stats_norm`, UserError for a file with no rows, and the readers' DataError
    naming file, row and column."""
    if stats_norm is None:
        raise RuntimeError("prediction needs stats_norm (it travels in the checkpoint)")
    if cached is not None and predict_is_kaggle(path, input_format):
        source = cached.get(path, False)
        records = source.records()  # ids are needed for the submission anyway
        rows = np.arange(len(records), dtype=np.int64)
        dataset = PairDataset(source.pairs(encoder).select(rows, stats_norm))
    else:
        records = read_any(path, input_format)
        dataset = PairDataset(normalise_stats(encoder.encode(records), stats_norm))
    if not len(dataset):
        raise UserError(f"{path}: no rows to predict")
    return records, dataset
