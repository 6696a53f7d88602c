"""Length-grouped batches: tokenized pairs -> batches of similar length, so padding wastes little.

Answers are long-tailed, so random batches with dynamic padding still spend most of the compute on
padding. Training batches are formed inside shuffled mega-batches (sorted by length there) and the
batch order is shuffled, so training stays random; evaluation batches are globally length-sorted.
Under DDP every rank takes its own share of the batches, with the same count per rank in training.
In evaluation every rank gets the same number of rows too: a rank short of a row (or with none: fewer
rows than ranks) is topped up with a copy of a row marked as padding (a negative index, see
`padding_index`), which the model scores but leaves out of metrics and predictions. So every rank runs
the same steps (and collectives) and no rank has an empty loader, while each row counts exactly once.
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


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler (yields lists of indices) grouping items of similar `lengths`."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, mega_batch_mult: int = 50,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
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
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (resuming mid-epoch)

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
            share = order[self.rank::self.num_replicas]
            per_rank = -(-len(order) // self.num_replicas)
            if len(share) < per_rank:
                filler = share[-1] if len(share) else order[-1]  # the shortest row at hand: cheapest
                share = np.concatenate([share, np.full(per_rank - len(share), padding_index(int(filler)))])
            return [share[i:i + self.batch_size] for i in range(0, len(share), self.batch_size)]
        return self.training_batches()[self.rank::self.num_replicas]

    def training_batches(self) -> list[np.ndarray]:
        """Every rank's training batches of this epoch, before they are dealt out."""
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        perm = rng.permutation(n)
        mega = self.batch_size * self.mega_batch_mult
        batches = []
        for start in range(0, n, mega):
            chunk = perm[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
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
