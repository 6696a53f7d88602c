"""benchmarks/synthetic_gap.py: the diagnosis of where a trained run's gap to the oracle goes."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark
from .test_interaction import interaction_checkpoint


@pytest.mark.slow
def test_the_diagnosis_splits_the_expected_gap_over_row_groups(tmp_path, tiny_tokenizer, synthetic_csv):
    _, _, path = interaction_checkpoint(tmp_path, tiny_tokenizer, synthetic_csv)

    found = load_benchmark("synthetic_gap").diagnose(path, rows=160)
    groups = found["groups"]
    off, on = groups["an answer off the prompt's topic"], groups["both answers on topic"]
    assert off["rows"] + on["rows"] == 160 and off["rows"] > 0
    # the two complementary groups hold the whole expected gap, as their row-weighted mean
    assert off["share_of_gap"] + on["share_of_gap"] == pytest.approx(1.0, abs=2e-3)
    mean = (off["rows"] * off["expected_gap"] + on["rows"] * on["expected_gap"]) / 160
    assert mean == pytest.approx(found["expected_gap"], abs=1e-3)
    # two steps from scratch are far from the oracle: a KL, never negative, and well above zero
    assert found["expected_gap"] > 0.05 and all(g["expected_gap"] >= 0 for g in groups.values())
    assert 0.0 <= found["topic_match_auc"] <= 1.0
