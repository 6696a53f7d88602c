import numpy as np
import pytest

from pref_lightning.data.pairs import STATS_FEATURES
from pref_lightning.data.stats_norm import LOG1P_AT_NORM, Z_LIMIT, apply_stats_norm, fit_stats_norm_array

FLAGS = [STATS_FEATURES.index(name) for name in ("empty", "null_turn")]


def training_stats(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    stats = rng.gamma(2.0, 2.0, size=(n, len(STATS_FEATURES)))
    stats[:, FLAGS] = 0.0
    stats[0, FLAGS[0]] = 1.0  # a flag set in 1 of 1,000 rows: z of ~30 without a bound
    return stats


def test_normalised_training_values_keep_their_shape_inside_the_bound():
    stats = training_stats()
    norm = fit_stats_norm_array(stats)
    z = apply_stats_norm(stats, norm)
    assert z.dtype == np.float32 and z.shape == stats.shape
    assert np.abs(z).max() <= Z_LIMIT + 1e-6
    # ordinary features are z-scores: centred, unit spread (turns columns after log1p)
    plain = [i for i, name in enumerate(STATS_FEATURES) if name not in LOG1P_AT_NORM and i not in FLAGS]
    assert np.allclose(z[:, plain].mean(0), 0.0, atol=0.05) and np.allclose(z[:, plain].std(0), 1.0, atol=0.1)


@pytest.mark.parametrize("factor", [10.0, 100.0, 1e6])
def test_every_statistic_far_outside_the_training_range_stays_in_it(factor):
    stats = training_stats()
    norm = fit_stats_norm_array(stats)
    seen = apply_stats_norm(stats, norm)
    for j in range(len(STATS_FEATURES)):
        row = stats[:1].copy()
        row[0, j] = factor * max(stats[:, j].max(), 1.0)
        z = apply_stats_norm(row, norm)
        assert seen[:, j].min() - 1e-6 <= z[0, j] <= seen[:, j].max() + 1e-6, STATS_FEATURES[j]


def test_a_rare_flag_cannot_dominate_and_an_unseen_flag_is_neutral():
    stats = training_stats()
    norm = fit_stats_norm_array(stats)
    every_flag = stats[:1].copy()
    every_flag[0, FLAGS] = 1.0
    z = apply_stats_norm(every_flag, norm)
    assert z[0, FLAGS[0]] == pytest.approx(Z_LIMIT)  # set once in training: ~30 sigma, bounded at the limit
    assert z[0, FLAGS[1]] == 0.0  # never set in training: the head never saw it, so it gets the mean


def test_non_finite_statistics_are_bounded_too():
    stats = training_stats()
    norm = fit_stats_norm_array(stats)
    row = stats[:3].copy()
    row[0, 0], row[1, 1], row[2, 2] = np.inf, -np.inf, np.nan
    assert np.isfinite(apply_stats_norm(row, norm)).all()


def test_normalisation_from_before_the_bounds_still_applies_with_the_fixed_limit():
    legacy = {"mean": [0.0] * len(STATS_FEATURES), "std": [1.0] * len(STATS_FEATURES)}
    row = np.arange(len(STATS_FEATURES), dtype=np.float32)[None] * 3.0
    z = apply_stats_norm(row, legacy)
    assert np.array_equal(z, np.clip(row, -Z_LIMIT, Z_LIMIT))  # no log1p: features as they were trained
