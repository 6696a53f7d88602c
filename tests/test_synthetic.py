from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pref_lightning.data import synthetic, text_stats
from pref_lightning.data.records import parse_turns


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticData:
    # ~0.7 s to generate; shared by the distribution tests below.
    return synthetic.generate(3500, seed=0)


@pytest.fixture(scope="module")
def stats(data: synthetic.SyntheticData) -> dict:
    return synthetic.summary(data)


def test_deterministic_by_seed() -> None:
    a = synthetic.generate(150, seed=3).frame
    b = synthetic.generate(150, seed=3).frame
    pd.testing.assert_frame_equal(a, b)
    c = synthetic.generate(150, seed=4).frame
    assert not a["response_a"].equals(c["response_a"])


def test_columns_and_json(data: synthetic.SyntheticData) -> None:
    frame = data.frame
    assert list(frame.columns) == [*synthetic.KAGGLE_COLUMNS, *synthetic.PROB_COLUMNS]
    assert frame["id"].is_unique and frame["id"].dtype.kind == "i"
    assert set(frame["model_a"]) <= set(synthetic.MODEL_NAMES)
    assert (frame["model_a"] != frame["model_b"]).all()
    for p, a, b in zip(frame["prompt"], frame["response_a"], frame["response_b"], strict=True):
        turns = [json.loads(p), json.loads(a), json.loads(b)]
        assert all(isinstance(t, list) and t for t in turns)
        assert len(turns[0]) == len(turns[1]) == len(turns[2])
        assert all(isinstance(x, str) for x in turns[0])
        assert all(x is None or isinstance(x, str) for x in turns[1] + turns[2])


def test_exactly_one_winner_and_probabilities(data: synthetic.SyntheticData) -> None:
    frame = data.frame
    winners = frame[list(synthetic.CLASS_COLUMNS)].to_numpy()
    assert set(np.unique(winners)) <= {0, 1}
    assert (winners.sum(axis=1) == 1).all()
    proba = data.true_proba
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert ((proba > 0) & (proba < 1)).all()
    labels = data.labels
    assert data.oracle_log_loss == pytest.approx(float(-np.log(proba[np.arange(len(labels)), labels]).mean()))


def test_lengths_look_like_arena(stats: dict) -> None:
    chars = stats["answer_chars"]
    assert 700 <= chars["median"] <= 1400
    assert 2500 <= chars["p95"] <= 5000
    assert chars["max"] > 10_000
    assert 0.0005 <= chars["frac_over_10k"] <= 0.02
    assert 60 <= stats["prompt_chars_median"] <= 160
    assert abs(stats["multi_turn_fraction"] - 0.13) <= 0.04


def test_multi_turn_rows_have_shorter_turns(data: synthetic.SyntheticData) -> None:
    turns = data.frame["response_a"].map(json.loads)
    n = turns.map(len)
    per_turn = turns.map(lambda ts: np.mean([len(t or "") for t in ts]))
    total = turns.map(lambda ts: sum(len(t or "") for t in ts))
    assert n.max() <= 4
    assert per_turn[n > 1].median() < 0.8 * per_turn[n == 1].median()
    assert 0.6 < total[n > 1].median() / total[n == 1].median() < 1.8


def test_class_balance(stats: dict) -> None:
    bal = stats["class_balance"]
    assert 0.28 <= bal["winner_model_a"] <= 0.42
    assert 0.28 <= bal["winner_model_b"] <= 0.42
    assert 0.24 <= bal["winner_tie"] <= 0.36


def test_signal_gaps(stats: dict) -> None:
    prior, oracle, text = stats["prior_log_loss"], stats["oracle_log_loss"], stats["text_stats_log_loss"]
    assert oracle <= prior - 0.25, stats
    assert oracle <= text - 0.10, stats
    assert text <= prior - 0.03, stats


def test_identical_answers_favour_ties(data: synthetic.SyntheticData) -> None:
    frame = data.frame
    same = (frame["response_a"] == frame["response_b"]).to_numpy()
    assert 0.01 <= same.mean() <= 0.035
    assert frame.loc[same, "p_tie"].mean() > frame["p_tie"].mean() + 0.3


def test_refusals_and_off_topic_lose(data: synthetic.SyntheticData) -> None:
    lat = data.latents
    assert lat is not None and len(lat) == len(data.frame)
    p_a = data.frame["p_model_a"].to_numpy()
    refused = lat["refusal_a"].to_numpy() & ~lat["refusal_b"].to_numpy()
    off = lat["off_topic_a"].to_numpy() & ~lat["off_topic_b"].to_numpy()
    assert refused.sum() > 50 and off.sum() > 50
    assert p_a[refused].mean() < p_a.mean() - 0.15
    assert p_a[off].mean() < p_a.mean() - 0.15
    # Refusals are padded with filler, so they are not simply the short answers.
    text_a = data.frame["response_a"].map(lambda c: sum(len(t or "") for t in json.loads(c)))
    assert text_a[lat["refusal_a"]].median() > 0.4 * text_a.median()


def test_null_turns_map_to_placeholder(data: synthetic.SyntheticData) -> None:
    cells = pd.concat([data.frame["response_a"], data.frame["response_b"]])
    with_null = [c for c in cells if None in json.loads(c)]
    assert with_null  # the real dump has JSON nulls; the generator reproduces a few
    vec = text_stats.side_stats(parse_turns(with_null[0]))
    assert vec[text_stats.SIDE_FEATURES.index("null_turn")] == 1.0


def test_write_csv_is_atomic_and_roundtrips(tmp_path: Path) -> None:
    frame = synthetic.generate(20, seed=1).frame
    out = synthetic.write_csv(frame, tmp_path / "sub" / "rows.csv")
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["rows.csv"]  # no temp file left behind
    back = pd.read_csv(out)
    assert back["response_a"].tolist() == frame["response_a"].tolist()
    np.testing.assert_allclose(back["p_tie"], frame["p_tie"])


def test_cli_writes_readable_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train.csv"
    assert synthetic.main(["--rows", "60", "--seed", "2", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_rows"] == 60
    for key in ("prior_log_loss", "oracle_log_loss", "text_stats_log_loss", "class_balance"):
        assert key in info
    frame = pd.read_csv(out)
    assert list(frame.columns) == [*synthetic.KAGGLE_COLUMNS, *synthetic.PROB_COLUMNS]
    assert frame["prompt"].map(json.loads).map(len).min() >= 1

    bare = tmp_path / "bare.csv"
    assert synthetic.main(["--rows", "30", "--out", str(bare), "--no-probs"]) == 0
    capsys.readouterr()
    assert list(pd.read_csv(bare).columns) == list(synthetic.KAGGLE_COLUMNS)
