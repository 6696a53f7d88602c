"""Swap augmentation: each training pair seen as (A, B) or (B, A) with its label (and soft target)
exchanged, by coins drawn from (seed, epoch, batch, rank) so that a resumed run flips the same coins."""

from __future__ import annotations

import numpy as np
import torch

SWAP_MODES = ("none", "random", "full")


def augment_generator(seed: int, epoch: int, batch_idx: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, batch, rank), not from the global RNG: a run resumed
    mid-epoch flips exactly the coins the uninterrupted run would have flipped."""
    state = np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def flip_coins(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) bool on `device`: which rows are seen in the exchanged order (probability 1/2 each)."""
    return (torch.rand(n, generator=generator) < 0.5).to(device)


def swap_labels(flip: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                swap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (n,) and soft targets (n, K) of the rows where `flip` (n,) holds in their exchanged classes
    (`swap`: the class permutation of an A/B exchange)."""
    labels = torch.where(flip.to(labels.device), swap[labels], labels)
    if targets is not None:
        targets = torch.where(flip.unsqueeze(1).to(targets.device), targets[:, swap], targets)
    return labels, targets


def swap_sides(flip: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats_a: torch.Tensor | None,
               stats_b: torch.Tensor | None):
    """Side vectors (n, d) and statistics (n, F) with A and B exchanged on the rows where `flip` (n,) holds."""
    col = flip.unsqueeze(1)
    a, b = torch.where(col, b, a), torch.where(col, a, b)
    if stats_a is not None:
        stats_a, stats_b = torch.where(col, stats_b, stats_a), torch.where(col, stats_a, stats_b)
    return a, b, stats_a, stats_b
