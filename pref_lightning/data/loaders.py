"""Batches of encoded pairs: the sampler (rows, or padded tokens per batch, grouped by length; sharded over
DDP ranks here, since the trainer runs with `use_distributed_sampler=false`), the collator and the loader;
and prediction's own loader (`predict_loader`), which needs no training-shaped object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler

from pref_lightning.core.errors import UserError
from pref_lightning.data.cache import PairCache
from pref_lightning.data.collate import PairCollator
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datasets import PairDataset, predict_pairs
from pref_lightning.data.loading import CachedFiles
from pref_lightning.data.pairs import PairEncoder
from pref_lightning.data.records import PairRecord
from pref_lightning.data.sampler import LengthGroupedSampler, ResumableLoader

EVAL_BUDGET_FACTOR = 4  # default eval_max_tokens = 4 * max_tokens: no activations are kept for backward


def token_budget(value: int | None, key: str) -> int | None:
    """A token budget setting as an int (None or 0: none). Raises UserError naming `key` below 1."""
    if value is not None and int(value) < 1:
        raise UserError(f"{key}={value} must be a positive number of tokens (or null: use batch sizes)")
    return int(value) if value else None


@dataclass(frozen=True)
class LoaderSettings:
    """How pairs are batched: `batch_size` rows, or (`max_tokens`) padded tokens per batch, grouped by length
    (training: shuffled within mega-batches of `mega_batch_mult` batches; evaluation: sorted), padded to a
    multiple of `pad_to_multiple_of` (None: to the longest row)."""

    num_workers: int = 0
    pad_to_multiple_of: int | None = None
    length_grouped: bool = True
    mega_batch_mult: int = 50
    seed: int = 42


def pair_loader(dataset: PairDataset, pad_id: int, layout: str, batch_size: int, shuffle: bool,
                max_tokens: int | None, settings: LoaderSettings, *, replicas: int = 1, rank: int = 0,
                epochs: int = 1, position: Callable[[], dict[str, int]] | None = None,
                resume: Callable[[dict[str, int]], None] | None = None,
                on_sampler: Callable[[LengthGroupedSampler], None] | None = None) -> DataLoader:
    """Training (`shuffle`) or evaluation loader of `batch_size` rows or `max_tokens` padded tokens per batch,
    this rank's share of `replicas`. `epochs`: the horizon over which a token-budget training epoch keeps one
    batch count. A length-grouped training loader is a `ResumableLoader` (`position` / `resume`: the exact
    mid-epoch position) and its sampler is handed to `on_sampler`."""
    common = {"num_workers": settings.num_workers, "collate_fn": PairCollator(pad_id, settings.pad_to_multiple_of),
              "persistent_workers": settings.num_workers > 0}
    if not settings.length_grouped and shuffle and max_tokens is None:
        sampler = DistributedSampler(dataset, replicas, rank, shuffle=shuffle, seed=settings.seed) \
            if replicas > 1 else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, **common)
    # evaluation without length grouping: equal lengths keep the input order, rows dealt out as below
    # (token budgets need the lengths whatever length_grouped says)
    lengths = [len(p) for p in dataset.pairs] if settings.length_grouped or max_tokens else [0] * len(dataset)
    if max_tokens and settings.pad_to_multiple_of:
        m = settings.pad_to_multiple_of
        lengths = [-(-n // m) * m for n in lengths]
    sampler = LengthGroupedSampler(lengths, batch_size, shuffle=shuffle, mega_batch_mult=settings.mega_batch_mult,
                                   seed=settings.seed, num_replicas=replicas, rank=rank, max_tokens=max_tokens,
                                   # backbone sequences per row: siamese 2; cross 1 in training (one
                                   # order per pair), 2 in evaluation (swap TTA runs both orders)
                                   sequences_per_row=2 if layout == "siamese" or not shuffle else 1,
                                   epochs=epochs)
    if not shuffle:
        return DataLoader(dataset, batch_sampler=sampler, **common)
    if on_sampler is not None:
        on_sampler(sampler)
    return ResumableLoader(dataset, batch_sampler=sampler, position=position, resume=resume, **common)


def predict_loader(path: str | Path, spec: EncodingSpec, tokenizer, batch_size: int, max_tokens: int | None = None,
                   *, input_format: str | None = None, cache_dir: str | Path | None = None, replicas: int = 1,
                   rank: int = 0, settings: LoaderSettings = LoaderSettings()) -> tuple[list[PairRecord], DataLoader]:
    """(every row of `path` in file order, the loader of this rank's share of them) for prediction with a
    checkpoint's complete `spec` (its `stats_norm` fitted) and tokenizer: evaluation batches of `batch_size`
    rows or `max_tokens` padded tokens, longest first; each pair's `index` is its row's position in the file.
    `cache_dir` (None: no cache) serves a Kaggle-format file's encoded pairs from the on-disk cache.

    Raises UserError for a token budget below 1 or a file with no rows, the readers' DataError naming file,
    row and column, and RuntimeError for a spec without `stats_norm`."""
    max_tokens = token_budget(max_tokens, "max_tokens")
    encoder = PairEncoder(tokenizer, spec)
    cached = CachedFiles(PairCache(cache_dir)) if cache_dir else None
    records, dataset = predict_pairs(path, encoder, spec.stats_norm, input_format=input_format, cached=cached)
    loader = pair_loader(dataset, encoder.pad_id, spec.layout, batch_size, False, max_tokens, settings,
                         replicas=replicas, rank=rank)
    return records, loader
