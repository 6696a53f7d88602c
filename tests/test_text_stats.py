from __future__ import annotations

import math

import numpy as np
import pytest

from pref_lightning.core.metrics import log_loss
from pref_lightning.data import text_stats as ts


def _feat(vec: np.ndarray, name: str) -> float:
    value = float(vec[ts.SIDE_FEATURES.index(name)])
    # Length-like counts are stored as log1p(count); undo it so tests can compare exact counts.
    return round(math.expm1(value)) if name in ts.LOG1P_FEATURES else value


MARKDOWN = "\n".join(
    [
        "# Title",
        "Intro line with five words.",
        "",
        "- first item",
        "* second item",
        "1. numbered item",
        "12) another numbered",
        "-not a list item",
        "```python",
        "# a comment, not a header",
        "- not a list item either",
        "```",
        "## Second header",
    ]
)


def test_side_stats_exact_counts() -> None:
    vec = ts.side_stats([MARKDOWN, "Second turn here."])
    assert vec.dtype == np.float32
    assert vec.shape == (len(ts.SIDE_FEATURES),)
    assert _feat(vec, "chars") == len(MARKDOWN) + len("Second turn here.")
    assert _feat(vec, "words") == len(MARKDOWN.split()) + 3
    assert _feat(vec, "lines") == 12 + 1  # 12 non-blank lines in the first turn, 1 in the second
    assert _feat(vec, "list_items") == 4
    assert _feat(vec, "code_blocks") == 1
    assert _feat(vec, "headers") == 2
    assert _feat(vec, "turns") == 2
    assert _feat(vec, "empty") == 0.0
    assert _feat(vec, "null_turn") == 0.0


def test_side_stats_empty_and_null() -> None:
    empty = ts.side_stats(["", "  \n "])
    assert _feat(empty, "empty") == 1.0
    assert _feat(empty, "null_turn") == 0.0
    assert _feat(empty, "turns") == 2
    assert _feat(empty, "words") == 0

    null = ts.side_stats([ts.NULL_TURN])
    assert _feat(null, "null_turn") == 1.0
    assert _feat(null, "empty") == 1.0
    assert _feat(null, "chars") == 0  # the placeholder itself is not counted as text

    mixed = ts.side_stats(["Real answer.", ts.NULL_TURN])
    assert _feat(mixed, "null_turn") == 1.0
    assert _feat(mixed, "empty") == 0.0
    assert _feat(mixed, "chars") == len("Real answer.")
    assert ts.NULL_TURN == "<null>"


def test_side_stats_deterministic_and_log1p() -> None:
    a = ts.side_stats(["x" * 999])
    b = ts.side_stats(["x" * 999])
    np.testing.assert_array_equal(a, b)
    assert a[ts.SIDE_FEATURES.index("chars")] == pytest.approx(math.log1p(999), rel=1e-6)


def test_pair_stats_layout() -> None:
    prompt = ["What is up?", "And now?"]
    a = ["- one\n- two", "Fine."]
    b = ["Short.", ""]
    vec = ts.pair_stats(prompt, a, b)
    k = len(ts.SIDE_FEATURES)
    assert vec.shape == (len(ts.PAIR_FEATURES),) == (3 * k + 2,)
    assert vec.dtype == np.float32
    np.testing.assert_allclose(vec[:k], ts.side_stats(a))
    np.testing.assert_allclose(vec[k : 2 * k], ts.side_stats(b))
    np.testing.assert_allclose(vec[2 * k : 3 * k], ts.side_stats(a) - ts.side_stats(b), rtol=1e-6)
    assert vec[ts.PAIR_FEATURES.index("prompt_chars")] == pytest.approx(math.log1p(len("What is up?") + 8))
    assert vec[ts.PAIR_FEATURES.index("prompt_turns")] == 2
    assert ts.PAIR_FEATURES[0] == "a_chars" and ts.PAIR_FEATURES[k] == "b_chars"
    assert len(set(ts.PAIR_FEATURES)) == len(ts.PAIR_FEATURES)


def test_pair_stats_matrix_shapes() -> None:
    rows = [(["p"], ["a"], ["b"]), (["q"], ["aa aa"], [ts.NULL_TURN])]
    X = ts.pair_stats_matrix(rows)
    assert X.shape == (2, len(ts.PAIR_FEATURES))
    np.testing.assert_array_equal(X[1], ts.pair_stats(*rows[1]))
    assert ts.pair_stats_matrix([]).shape == (0, len(ts.PAIR_FEATURES))
    # Generators work too (the data is streamed in practice).
    assert ts.pair_stats_matrix(r for r in rows).shape == (2, len(ts.PAIR_FEATURES))


def _toy_problem(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a known linear softmax on 4 features (one constant, one pure noise)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [rng.normal(2.0, 3.0, n), rng.normal(-1.0, 0.5, n), np.full(n, 7.0), rng.normal(size=n)]
    )
    z = (X[:, 0] - 2.0) / 3.0
    w = (X[:, 1] + 1.0) / 0.5
    logits = np.column_stack([1.5 * z, -1.5 * z, 0.8 * w])
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)[:, :2]).sum(axis=1)
    return X, y


def test_logistic_regression_recovers_signal() -> None:
    X, y = _toy_problem()
    model = ts.fit_logistic_regression(X, y)
    assert model.weights.shape == (4, 3) and model.bias.shape == (3,)
    assert model.std[2] == 1.0  # constant column guarded against division by zero
    # Softmax is shift-invariant per feature, so compare class contrasts, not raw weights.
    contrast = model.weights[:, 0] - model.weights[:, 1]
    assert contrast[0] > 2.0  # true value 3.0 on the standardised scale
    assert abs(contrast[3]) < 0.3  # noise feature
    assert model.weights[1, 2] - model.weights[1, 0] > 0.4

    proba = model.predict_proba(X)
    assert proba.shape == (len(y), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba.argmax(axis=1) == y).mean() > 0.55


def test_logistic_regression_deterministic() -> None:
    X, y = _toy_problem(500)
    m1 = ts.fit_logistic_regression(X, y)
    m2 = ts.fit_logistic_regression(X, y)
    np.testing.assert_array_equal(m1.weights, m2.weights)
    np.testing.assert_array_equal(m1.bias, m2.bias)


def test_cross_validated_log_loss_beats_prior() -> None:
    X, y = _toy_problem()
    freq = np.bincount(y, minlength=3) / len(y)
    prior = float(-np.log(freq[y]).mean())
    cv = ts.cross_validated_log_loss(X, y, n_folds=5, seed=0)
    assert cv < prior - 0.1
    assert cv == ts.cross_validated_log_loss(X, y, n_folds=5, seed=0)
    # Pure-noise features cannot beat the prior by more than sampling noise.
    noise = np.random.default_rng(1).normal(size=(len(y), 3))
    assert ts.cross_validated_log_loss(noise, y) > prior - 0.01


def test_log_loss_clips_and_validates() -> None:
    proba = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert log_loss(proba, np.array([0, 1])) == pytest.approx(math.log(2) / 2)
    assert log_loss(proba, np.array([1, 2])) == pytest.approx(-math.log(1e-15))
    with pytest.raises(ValueError):
        ts.cross_validated_log_loss(np.zeros((3, 1)), np.zeros(3, dtype=int), n_folds=5)
    with pytest.raises(ValueError):
        ts.fit_logistic_regression(np.zeros((3, 1)), np.array([0, 1, 3]))


def test_refusal_flag_looks_at_the_start_of_each_turn() -> None:
    from pref_lightning.data.text_stats import refusal

    assert refusal(["I'm sorry, but I can't help with that."]) == 1.0
    assert refusal(["Sure!", "As an AI language model, I do not browse."]) == 1.0
    assert refusal(["Here is the poem you asked for."]) == 0.0
    assert refusal([ts.NULL_TURN, ""]) == 0.0
    assert refusal(["x" * 400 + " I'm sorry"]) == 0.0  # an apology deep inside an answer is no refusal


def test_answer_overlap_and_identity() -> None:
    from pref_lightning.data.text_stats import answer_overlap

    assert answer_overlap(["The cat sat."], ["the  CAT sat."]) == (1.0, 1.0)
    overlap, identical = answer_overlap(["a b c d"], ["c d e f"])
    assert overlap == pytest.approx(2 / 6) and identical == 0.0
    assert answer_overlap([ts.NULL_TURN], [""]) == (1.0, 1.0)  # two empty answers are alike
    assert answer_overlap(["alpha"], ["beta"]) == (0.0, 0.0)
