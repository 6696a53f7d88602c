"""Tokenized pairs -> padded batches (dynamic padding: each batch only to its own longest side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pref_lightning.data.pairs import EncodedPair


class PairCollator:
    """Stack sides A and B of a batch into one (2B, L) tensor so the encoder runs once per batch.

    Rows 0..B-1 are the A sides, rows B..2B-1 the B sides (cross layout: rows 0..B-1 the pairs in order
    (A, B), rows B..2B-1 the same pairs with the answers exchanged); `stats` is (2B, F): A's, then B's.
    Training batches may also hold `ties` (B,) bool and `weight` (B,) float32 (only when some row is
    tie-less or weighted), `source` (B,) long (only when some row comes from an extra source: its index,
    0 the training file) and `targets` (B, K) float32 (when the rows carry teacher targets): see losses.py
    and `model.source_heads`. L is the longest sequence in the batch,
    rounded up to `pad_to_multiple_of` (8 suits tensor cores on GPUs). A batch holding padding rows
    (DDP evaluation, see `sampler.py`) also has `valid`: False for those rows; other batches have none.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        sides = [item.ids_a for item in items]
        if items[0].ids_b is not None:
            sides += [item.ids_b for item in items]
        length = max(len(s) for s in sides)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sides), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sides), length), dtype=torch.long)
        for row, ids in enumerate(sides):
            input_ids[row, : len(ids)] = torch.from_numpy(ids.astype("int64"))
            attention_mask[row, : len(ids)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([item.label for item in items], dtype=torch.long),
            "index": torch.tensor([item.index for item in items], dtype=torch.long),
        }
        if any(item.padding for item in items):
            batch["valid"] = torch.tensor([not item.padding for item in items], dtype=torch.bool)
        if not all(item.ties for item in items):
            batch["ties"] = torch.tensor([item.ties for item in items], dtype=torch.bool)
        if any(item.weight != 1.0 for item in items):
            batch["weight"] = torch.tensor([item.weight for item in items], dtype=torch.float32)
        if any(item.source for item in items):
            batch["source"] = torch.tensor([item.source for item in items], dtype=torch.long)
        if items[0].target is not None:
            batch["targets"] = torch.from_numpy(np.stack([item.target for item in items]).astype(np.float32))
        if items[0].stats_a is not None:
            stats = np.stack([item.stats_a for item in items] + [item.stats_b for item in items])
            batch["stats"] = torch.from_numpy(stats)
        return batch


def side_groups(lengths: Sequence[int], max_groups: int) -> list[list[int]]:
    """Rows of a padded batch (their real `lengths`) split into at most `max_groups` groups of similar
    length, each to be run padded to its own longest row: the split of the length-sorted rows that
    minimises the processed tokens sum(rows * longest) (exact dynamic programming over the cut points).

    Groups come longest first and list row positions (longest first inside a group); one group of all
    rows when `max_groups` <= 1. E.g. lengths [5, 100, 7, 90] with 2 groups: [[1, 3], [2, 0]].
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    if max_groups <= 1 or n <= 1:
        return [order]
    sorted_len = np.array([max(int(lengths[i]), 1) for i in order], dtype=np.float64)
    k = min(max_groups, n)
    # cost[i, j]: rows i..j-1 (sorted) padded to row i's length; best[g, j]: rows 0..j-1 in g groups
    i, j = np.arange(n)[:, None], np.arange(n + 1)[None, :]
    cost = np.where(j > i, (j - i) * sorted_len[:, None], np.inf)
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((k + 1, n + 1), dtype=np.int64)
    for g in range(1, k + 1):
        total = best[g - 1, :n, None] + cost  # (start i, end j)
        cut[g] = total.argmin(axis=0)
        best[g] = total.min(axis=0)
    g = int(best[1:, n].argmin()) + 1  # fewest groups among the cheapest (argmin takes the first)
    bounds, end = [], n
    while g > 0:
        start = int(cut[g, end])
        bounds.append((start, end))
        end, g = start, g - 1
    return [order[s:e] for s, e in reversed(bounds)]
