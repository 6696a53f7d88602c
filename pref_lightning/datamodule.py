"""LightningDataModule: records -> prompt-grouped train/validation split -> tokenized pairs -> batches."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from pref_lightning.collate import PairCollator
from pref_lightning.pairs import EncodedPair, PairEncoder
from pref_lightning.records import PairRecord, class_prior, label_array, prior_log_loss, read_records
from pref_lightning.sampler import LengthGroupedSampler

log = logging.getLogger(__name__)


def prompt_key(record: PairRecord) -> str:
    """Normalised prompt text: rows sharing it must fall on the same side of a split."""
    return " ".join(" ".join(record.prompt).lower().split())


def grouped_split(records: Sequence[PairRecord], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) with whole prompt groups in validation, chosen by a seeded hash order.

    Hashing the group key (rather than shuffling positions) makes the split independent of row order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(prompt_key(record), []).append(i)
    order = sorted(groups, key=lambda k: hashlib.sha1(f"{seed}\0{k}".encode()).hexdigest())
    target = val_fraction * len(records)
    val: list[int] = []
    for key in order:
        if len(val) >= target:
            break
        val.extend(groups[key])
    if len(val) == len(records) or not val:
        raise ValueError(
            f"cannot hold out data.val_fraction={val_fraction} of {len(records)} rows "
            f"({len(groups)} distinct prompts)"
        )
    val_set = set(val)
    return [i for i in range(len(records)) if i not in val_set], sorted(val)


def fit_stats_norm(pairs: Sequence[EncodedPair]) -> dict[str, list[float]]:
    """Mean and std of the per-side statistics over both sides of the training pairs."""
    stats = np.stack([p.stats_a for p in pairs] + [p.stats_b for p in pairs]).astype(np.float64)
    std = stats.std(0)
    return {"mean": stats.mean(0).tolist(), "std": np.where(std > 1e-6, std, 1.0).tolist()}


def normalise_stats(pairs: list[EncodedPair], norm: dict[str, list[float]]) -> list[EncodedPair]:
    mean = np.asarray(norm["mean"], dtype=np.float32)
    std = np.asarray(norm["std"], dtype=np.float32)
    for pair in pairs:
        pair.stats_a = (pair.stats_a - mean) / std
        pair.stats_b = (pair.stats_b - mean) / std
    return pairs


class PairDataset:
    """A list of encoded pairs; a plain sequence is all a DataLoader needs."""

    def __init__(self, pairs: list[EncodedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> EncodedPair:
        return self.pairs[i]


class PreferenceDataModule(L.LightningDataModule):
    """Reads the training file (or generates the embedded synthetic set), splits, tokenizes, batches.

    The tokenizer is attached by the pipeline (`attach_tokenizer`) once it is known, because the tiny
    offline backbone trains its tokenizer on this module's training texts.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        predict_path: str | None = None,
        val_fraction: float = 0.1,
        max_length: int = 512,
        prompt_fraction: float = 0.3,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        synthetic_rows: int = 10_000,
        synthetic_seed: int = 0,
        split_seed: int = 42,
        stats_norm: dict[str, list[float]] | None = None,
        length_grouped: bool = True,
        mega_batch_mult: int = 50,
        layout: str = "siamese",
        naive_truncation: bool = False,
    ) -> None:
        super().__init__()
        self.train_path = train_path
        self.val_path = val_path  # an explicit validation file replaces the held-out split
        self.predict_path = predict_path
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.prompt_fraction = prompt_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.synthetic_rows = synthetic_rows
        self.synthetic_seed = synthetic_seed
        self.split_seed = split_seed
        # mean/std of the per-side statistics: fitted on the training split, or given (prediction)
        self.stats_norm = stats_norm
        # batches of similar length (training: shuffled within mega-batches; evaluation: sorted)
        self.length_grouped = length_grouped
        self.mega_batch_mult = mega_batch_mult
        self.layout = layout  # siamese: one sequence per side; cross: one sequence per row
        self.naive_truncation = naive_truncation
        self.tokenizer = None
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

    def load_records(self) -> None:
        """Read and split the training data once (cheap to call again)."""
        if self.train_records is not None:
            return
        if self.train_path:
            records = read_records(Path(self.train_path), require_labels=True)
        else:
            from pref_lightning.records import records_from_frame
            from pref_lightning.synthetic import generate

            frame = generate(self.synthetic_rows, seed=self.synthetic_seed).frame
            records = records_from_frame(frame, self.source_name, require_labels=True)
        if self.val_path:
            self.train_records = records
            self.val_records = read_records(Path(self.val_path), require_labels=True)
        else:
            train_idx, val_idx = grouped_split(records, self.val_fraction, self.split_seed)
            self.train_records = [records[i] for i in train_idx]
            self.val_records = [records[i] for i in val_idx]
        log.info("%s: %d train rows, %d validation rows", self.source_name, len(self.train_records),
                 len(self.val_records))

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
        return label_array(self.train_records)

    @property
    def train_prior(self) -> np.ndarray:
        return class_prior(self.train_labels)

    def validation_reference(self) -> dict[str, float]:
        """Log losses to judge the model by on the validation split: the train prior and the oracle."""
        self.load_records()
        val_labels = label_array(self.val_records)
        out = {"prior_log_loss": prior_log_loss(self.train_labels, val_labels)}
        if all(r.oracle is not None for r in self.val_records):
            probs = np.array([r.oracle for r in self.val_records], dtype=np.float64)
            out["oracle_log_loss"] = float(-np.log(np.clip(probs[np.arange(len(val_labels)), val_labels], 1e-15, 1)).mean())
        return out

    # ---- tokenization -------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoder = PairEncoder(tokenizer, self.max_length, self.prompt_fraction, layout=self.layout,
                                   naive_truncation=self.naive_truncation)

    def _require_encoder(self) -> PairEncoder:
        if self.encoder is None:
            raise RuntimeError("attach_tokenizer() must be called before setup()")
        return self.encoder

    def setup(self, stage: str | None = None) -> None:
        encoder = self._require_encoder()
        if stage in (None, "fit", "validate"):
            self.load_records()
            if self.train_set is None:
                train_pairs = encoder.encode(self.train_records)
                if self.stats_norm is None:
                    self.stats_norm = fit_stats_norm(train_pairs)
                self.train_set = PairDataset(normalise_stats(train_pairs, self.stats_norm))
                self.val_set = PairDataset(normalise_stats(encoder.encode(self.val_records), self.stats_norm))
        if stage in (None, "predict") and self.predict_path and self.predict_set is None:
            if self.stats_norm is None:
                raise RuntimeError("prediction needs stats_norm (it travels in the checkpoint)")
            self.predict_records = read_records(self.predict_path, require_labels=False)
            self.predict_set = PairDataset(normalise_stats(encoder.encode(self.predict_records), self.stats_norm))

    def settings(self) -> dict:
        """What prediction needs to encode rows exactly as training did (stored in checkpoints)."""
        return {"max_length": self.max_length, "prompt_fraction": self.prompt_fraction,
                "stats_norm": self.stats_norm, "layout": self.layout, "naive_truncation": self.naive_truncation}

    # ---- loaders ------------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: PairDataset, batch_size: int, shuffle: bool) -> DataLoader:
        collate = PairCollator(self.encoder.pad_id, self.pad_to_multiple_of)
        common = {"num_workers": self.num_workers, "collate_fn": collate,
                  "persistent_workers": self.num_workers > 0}
        replicas, rank = self._replicas()
        if not self.length_grouped:
            # the trainer runs with use_distributed_sampler=false, so sharding is done here
            sampler = DistributedSampler(dataset, replicas, rank, shuffle=shuffle, seed=self.split_seed) \
                if replicas > 1 else None
            return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                              sampler=sampler, **common)
        sampler = LengthGroupedSampler([len(p) for p in dataset.pairs], batch_size, shuffle=shuffle,
                                       mega_batch_mult=self.mega_batch_mult, seed=self.split_seed,
                                       num_replicas=replicas, rank=rank)
        return DataLoader(dataset, batch_sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.eval_batch_size, shuffle=False)
