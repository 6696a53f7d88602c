"""Length-grouped batches: tokenized pairs -> batches of similar length, so padding wastes little.

Answers are long-tailed, so random batches with dynamic padding still spend most of the compute on
padding. Training batches are formed inside shuffled mega-batches (sorted by length there) and the
batch order is shuffled, so training stays random; evaluation batches are globally length-sorted.
Under DDP every rank takes its own share of the batches, with the same count per rank in training.
In evaluation every rank gets the same number of rows too: a rank short of a row (or with none: fewer
rows than ranks) is topped up with a copy of a row marked as padding (a negative index, see
`padding_index`), which the model scores but leaves out of metrics and predictions. So every rank runs
the same steps (and collectives) and no rank has an empty loader, while each row counts exactly once.

Token budgets (`max_tokens` instead of `batch_size`): a batch holds as many length-sorted rows as fit
`rows * longest * sequences_per_row <= max_tokens` (the padded input tensor's size; a single row longer
than the budget forms a batch of its own). Training then has a variable number of batches per epoch from
the greedy fill; it is made the same in every epoch of `epochs` (the largest count among them, reached
by splitting the largest batches), so that `len()` and the learning-rate schedule are exact. In
evaluation every rank splits batches until all ranks have the same count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler


def padding_index(row: int) -> int:
    """The index a sampler yields for a padding copy of dataset row `row` (>= 0): negative."""
    return -1 - row


def padded_row(index: int) -> int:
    """The dataset row a (negative) padding index copies."""
    return -1 - index


def budget_batches(order: np.ndarray, lengths: np.ndarray, max_tokens: int, sequences: int = 1) -> list[np.ndarray]:
    """`order` (indices sorted by decreasing length) cut greedily into batches whose padded size
    `rows * longest * sequences` stays within `max_tokens`; a row over the budget alone is a batch."""
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, max_tokens // (longest * sequences))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def split_to(batches: list[np.ndarray], count: int) -> list[np.ndarray]:
    """`batches` with the largest ones halved (in place of the original) until there are `count` of them
    (or every batch is a single row); halves keep within any token budget their parent kept."""
    batches = list(batches)
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            break
        batch = batches[largest]
        half = len(batch) // 2
        batches[largest:largest + 1] = [batch[:half], batch[half:]]
    return batches


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler (yields lists of indices) grouping items of similar `lengths`.

    Batches hold `batch_size` rows, or (with `max_tokens`) as many as fit the token budget (module
    docstring); `sequences_per_row` (2 in the siamese layout) and `epochs` (the horizon over which the
    training batch count is made constant) only matter with `max_tokens`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int | None = None, shuffle: bool = True,
                 mega_batch_mult: int = 50, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 max_tokens: int | None = None, sequences_per_row: int = 1, epochs: int = 1) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be positive")
        if max_tokens is None and (batch_size is None or batch_size < 1):
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.mega_batch_mult = max(1, mega_batch_mult)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_tokens = max_tokens
        self.sequences_per_row = max(1, int(sequences_per_row))
        self.epochs = max(1, int(epochs))
        self._epoch_count: int | None = None  # training batches per epoch under a token budget (cached)
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (resuming mid-epoch)

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """`order` (sorted by decreasing length) cut into batches of `batch_size` rows or by the budget."""
        if self.max_tokens is not None:
            return budget_batches(order, self.lengths, self.max_tokens, self.sequences_per_row)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Continue epoch `epoch` after its first `batches` batches (a run resumed mid-epoch)."""
        self.epoch = epoch
        self.start_batch = batches if 0 < batches < len(self) else 0

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches of this epoch."""
        if not self.shuffle:
            # evaluation: items (not batches) are dealt out, longest first, so that a memory problem
            # shows at the first batch; no row is repeated, and a rank short of rows is topped up with
            # padding copies (negative indices) so that every rank has the same number of rows
            order = np.argsort(-self.lengths, kind="stable")
            per_rank = -(-len(order) // self.num_replicas)
            shares = []
            for rank in range(self.num_replicas):
                share = order[rank::self.num_replicas]
                if len(share) < per_rank:
                    filler = share[-1] if len(share) else order[-1]  # the shortest row at hand: cheapest
                    share = np.concatenate([share, np.full(per_rank - len(share), padding_index(int(filler)))])
                shares.append(share)
            if self.max_tokens is None:
                return self._cut(shares[self.rank])
            # token budgets: every rank runs as many batches as the rank needing the most
            cut = [self._cut(np.where(share < 0, padded_row(share), share)) for share in shares]
            count = max(len(batches) for batches in cut)
            mine = split_to(cut[self.rank], count)
            # the cut read padding copies as their rows (for the lengths): put the padding indices back
            share, start, out = shares[self.rank], 0, []
            for batch in mine:
                out.append(share[start:start + len(batch)])
                start += len(batch)
            return out
        return self.training_batches()[self.rank::self.num_replicas]

    def _mega_rows(self) -> int:
        if self.max_tokens is None:
            return self.batch_size * self.mega_batch_mult
        typical = max(1.0, float(np.mean(self.lengths)) if len(self.lengths) else 1.0) * self.sequences_per_row
        return max(1, int(self.max_tokens // typical)) * self.mega_batch_mult

    def _epoch_cut(self, epoch: int) -> tuple[np.random.Generator, list[np.ndarray]]:
        """The epoch's generator and its batches in mega-batch order: rows shuffled, cut into mega-batches,
        each sorted by decreasing length and cut into batches."""
        rng = np.random.default_rng((self.seed, epoch))
        perm = rng.permutation(len(self.lengths))
        mega = self._mega_rows()
        batches = []
        for start in range(0, len(perm), mega):
            chunk = perm[start:start + mega]
            batches.extend(self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")]))
        return rng, batches

    def epoch_count(self) -> int:
        """Training batches per epoch (all ranks, before DDP's repeats) under a token budget: the largest
        greedy count over the first `epochs` epochs, so that every epoch has the same number."""
        if self._epoch_count is None:
            self._epoch_count = max(len(self._epoch_cut(epoch)[1]) for epoch in range(self.epochs))
        return self._epoch_count

    def training_batches(self) -> list[np.ndarray]:
        """Every rank's training batches of this epoch (in shuffled order), before they are dealt out."""
        rng, batches = self._epoch_cut(self.epoch)
        if self.max_tokens is not None:
            batches = split_to(batches, self.epoch_count())
        rng.shuffle(batches)
        if self.num_replicas > 1 and len(batches) % self.num_replicas:
            # training under DDP: every rank must take the same number of steps; repeat a few batches
            extra = self.num_replicas - len(batches) % self.num_replicas
            batches.extend(batches[:extra])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # the skip applies to one pass only (Lightning may stop iterating before the generator ends)
        start, self.start_batch = self.start_batch, 0
        for batch in self.rank_batches()[start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        # forming the batches is a few milliseconds of numpy even for 100k rows
        return len(self.rank_batches())


class ResumableLoader(DataLoader):
    """A training DataLoader that tells Lightning it is resumable (`state_dict` / `load_state_dict`).

    The position itself is kept by the datamodule (`PreferenceDataModule.state_dict`), because Lightning
    restores a datamodule before it builds the training loader, while loader states are applied only
    if the loader is built after the restore (`estimated_stepping_batches` builds it earlier).
    """

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]],
                 resume: Callable[[dict[str, int]], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self.resume = resume

    def state_dict(self) -> dict[str, int]:
        return self.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume(state)


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens when each batch is padded to its longest item."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    processed = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / max(processed, 1)
