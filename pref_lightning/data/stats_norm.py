"""Bounded normalisation of the per-side statistics fed to the hybrid head.

Raw statistics (`pairs.STATS_FEATURES`) are counts and 0/1 flags. Z-normalised with the training split's
mean and std alone, a value the training split rarely or never saw (a flag set in 1 of 1,000 rows gives
z ~ 30; a count 100x the training maximum) reaches the head far outside anything it was fitted on, and a
linear path turns it into an extreme logit (class probabilities ~1e-8 on rows with null answers). So every
feature is bounded:

1. raw counts that are not yet compressed (`turns`, `prompt_turns`) are log1p-compressed;
2. z = (x - mean) / std with the training split's mean and std;
3. z is clipped to the range the training split itself spans (a value never seen cannot extrapolate) and
   to |z| <= `z_limit` (a rare flag cannot dominate the head).

The fitted normalisation is a plain dict (it travels in every checkpoint's data settings):
`{"version": 2, "log1p": [...], "mean": [...], "std": [...], "low": [...], "high": [...], "z_limit": 5.0}`.
A dict without `version` (checkpoints written before the bounds) has only `mean` and `std`: its features
are used as they were trained, and clipped to |z| <= `Z_LIMIT` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pref_lightning.data.pairs import STATS_FEATURES, EncodedPair

__all__ = ["LOG1P_AT_NORM", "STATS_NORM_VERSION", "Z_LIMIT", "apply_stats_norm", "fit_stats_norm",
           "fit_stats_norm_array", "fit_stats_norm_table", "normalise_stats"]

STATS_NORM_VERSION = 2
Z_LIMIT = 5.0
# raw counts in STATS_FEATURES that side_features leaves uncompressed (the others are log1p already or flags)
LOG1P_AT_NORM: tuple[str, ...] = ("turns", "prompt_turns")


def _transform(stats: np.ndarray, log1p: Sequence[str]) -> np.ndarray:
    x = np.nan_to_num(np.asarray(stats, dtype=np.float64), nan=0.0, posinf=1e12, neginf=-1e12)
    if log1p:
        cols = [STATS_FEATURES.index(name) for name in log1p]
        x[:, cols] = np.log1p(np.maximum(x[:, cols], 0.0))
    return x


def fit_stats_norm_array(stats: np.ndarray, z_limit: float = Z_LIMIT) -> dict[str, Any]:
    """The bounded normalisation of raw statistics `stats` (n_sides, n_features) of the training split."""
    if z_limit <= 0:
        raise ValueError(f"data.stats_z_limit={z_limit} must be > 0")
    x = _transform(stats, LOG1P_AT_NORM)
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # constant features stay centred at 0
    z = (x - mean) / std
    return {"version": STATS_NORM_VERSION, "log1p": list(LOG1P_AT_NORM), "mean": mean.tolist(),
            "std": std.tolist(), "low": z.min(0).tolist(), "high": z.max(0).tolist(), "z_limit": float(z_limit)}


def apply_stats_norm(stats: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """Normalised, bounded statistics (float32, same shape as `stats`), as the head was trained on them."""
    stats = np.asarray(stats)
    if stats.size == 0:
        return stats.astype(np.float32)
    x = _transform(stats.reshape(-1, stats.shape[-1]), norm.get("log1p", ()) if norm.get("version") else ())
    z = (x - np.asarray(norm["mean"], dtype=np.float64)) / np.asarray(norm["std"], dtype=np.float64)
    limit = float(norm.get("z_limit", Z_LIMIT))
    low, high = np.full(z.shape[1], -limit), np.full(z.shape[1], limit)
    if "low" in norm:
        low, high = np.maximum(low, norm["low"]), np.minimum(high, norm["high"])
    return np.clip(z, low, high).astype(np.float32).reshape(stats.shape)


def fit_stats_norm(pairs: Sequence[EncodedPair]) -> dict[str, Any]:
    """The bounded normalisation of both sides' raw statistics of the training pairs."""
    return fit_stats_norm_array(np.stack([p.stats_a for p in pairs] + [p.stats_b for p in pairs]))


def fit_stats_norm_table(table: Any, rows: np.ndarray) -> dict[str, Any]:
    """`fit_stats_norm` of the pairs at `rows` (file positions) of an encoded table (a `cache.EncodedTable`,
    not imported: cache.py imports this module): the same numbers, no per-pair objects."""
    return fit_stats_norm_array(np.concatenate([table.stats_a[rows], table.stats_b[rows]]))


def normalise_stats(pairs: list[EncodedPair], norm: Mapping[str, Any]) -> list[EncodedPair]:
    """Normalise each pair's raw statistics in place with the fitted `norm`; returns `pairs`."""
    for pair in pairs:
        pair.stats_a = apply_stats_norm(pair.stats_a, norm)
        pair.stats_b = apply_stats_norm(pair.stats_b, norm)
    return pairs
