"""RUN/report.md and its plots, written from arrays (fast) and by train.py (see test_end_to_end)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from pref_lightning.train.report import (
    PLOTS,
    confusion_counts,
    expected_calibration_error,
    read_curves,
    reliability_curve,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"val_log_loss": 0.95, "val_accuracy": 0.55, "temperature": 1.2, "val_log_loss_uncalibrated": 0.95,
           "val_log_loss_calibrated": 0.93, "prior_log_loss": 1.09, "oracle_log_loss": 0.8, "train_rows": 900,
           "val_rows": 100, "data": "synthetic(rows=1000, seed=0)", "backbone": "tiny", "epochs": 2,
           "best_checkpoint": "/x/checkpoints/best.ckpt", "wall_seconds": 75.5, "gain_over_prior": 0.14}


def fake_predictions(n=100, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3))
    labels = rng.integers(0, 3, size=n)
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def write_metrics_csv(path):
    path.write_text("epoch,step,train/loss,train/log_loss,val/log_loss,val/prior_log_loss,lr-AdamW/head\n"
                    "0,1,1.10,,,,0.001\n0,3,1.00,,,,\n0,4,,1.02,0.98,1.09,\n1,7,0.90,,,,\n1,9,,,0.95,1.09,\n")
    return path


def check_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_report_files_and_sections(tmp_path):
    probs, labels = fake_predictions()
    cfg = OmegaConf.create({"seed": 7, "model": {"lr": 1e-3}, "out": "${seed}"})
    path = write_report(tmp_path, cfg, METRICS, probs, labels, write_metrics_csv(tmp_path / "metrics.csv"))
    assert path == tmp_path / "report.md"
    for name in PLOTS:
        check_png(tmp_path / "plots" / f"{name}.png")
        assert f"](plots/{name}.png)" in path.read_text()
    text = path.read_text()
    for heading in ("# Training report", "## Data", "## Metrics (validation)", "## Time", "## Plots", "## Config"):
        assert heading in text
    assert "| train | 900 |" in text and "| validation | 100 |" in text and "(100 rows scored)" in text
    # gains over the train prior, uniform and the validation rows' prior (the last two absent here: "-")
    assert "| model (best checkpoint) | 0.9500 | 0.1400 | - | - | 0.5500 |" in text
    assert "class prior of the train split | 1.0900 | 0.0000" in text and "oracle" in text
    assert "## WARNING" not in text
    assert "T = 1.200" in text and "75.5 s" in text
    assert "seed: 7" in text and "out: 7" in text  # resolved config in a yaml block
    ece = expected_calibration_error(probs, labels)
    assert f"{ece:.4f}" in text
    # nothing half-written is left behind
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_without_csv_or_oracle(tmp_path):
    probs, labels = fake_predictions(30, seed=1)
    metrics = {k: v for k, v in METRICS.items() if k not in ("oracle_log_loss", "val_log_loss_calibrated")}
    path = write_report(tmp_path, {"seed": 1}, metrics, probs, labels, None)
    text = path.read_text()
    assert "oracle" not in text and "calibrated" not in text
    for name in PLOTS:
        check_png(tmp_path / "plots" / f"{name}.png")


def test_read_curves_skips_empty_cells(tmp_path):
    curves = read_curves(write_metrics_csv(tmp_path / "m.csv"))
    steps, values = curves["train/loss"]
    assert steps.tolist() == [1, 3, 7] and values.tolist() == [1.10, 1.00, 0.90]
    assert curves["val/log_loss"][0].tolist() == [4, 9] and curves["train/log_loss"][1].tolist() == [1.02]
    assert set(curves) == {"train/loss", "train/log_loss", "val/log_loss"}  # learning rates etc. ignored
    assert read_curves(tmp_path / "missing.csv") == {} and read_curves(None) == {}


def test_confusion_and_calibration_numbers():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 2, 2])
    assert confusion_counts(probs, labels).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # perfectly calibrated bins give 0; always-wrong confident rows give their confidence
    assert expected_calibration_error(np.array([[0.9, 0.05, 0.05]] * 4), np.array([1, 1, 1, 1])) == pytest.approx(0.9)
    mean_p, freq, counts = reliability_curve(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 0, 1, 1]))
    assert mean_p.tolist() == [0.05, 0.95] and freq.tolist() == [0.0, 1.0] and counts.tolist() == [2, 2]


def test_report_says_loudly_when_the_model_is_broken(tmp_path):
    probs, labels = fake_predictions(30, seed=2)
    metrics = {**METRICS, "warnings": ["the model is worse than uniform on validation"]}
    text = write_report(tmp_path, {"seed": 1}, metrics, probs, labels, None).read_text()
    assert "## WARNING" in text and "**the model is worse than uniform on validation**" in text
    assert text.index("## WARNING") < text.index("## Data")


def test_curves_draw_the_baseline_and_the_kept_model_after_the_anchor_fallback(tmp_path):
    # after the fallback curves.png showed only the trained model's 1.0395 while the table said 1.0355
    from pref_lightning.train.report import plot_curves

    csv_path = write_metrics_csv(tmp_path / "metrics.csv")
    fallback = {**METRICS, "val_log_loss": 1.0355, "baseline_log_loss": 1.0355,
                "anchor_fallback": {"trained_log_loss": 1.0395, "baseline_log_loss": 1.0355}}
    labels = plot_curves(tmp_path / "curves.png", read_curves(csv_path), fallback)
    check_png(tmp_path / "curves.png")
    assert "val: statistics baseline (step 0)" in labels
    assert "val: kept model = the baseline (1.0355; trained model 1.0395 fell behind it)" in labels
    assert not any("tie-less" in label for label in labels)  # no tie-less rows: no note
    plain = plot_curves(tmp_path / "plain.png", read_curves(csv_path), METRICS)
    assert "val: kept model, best checkpoint (0.9500)" in plain and not any("baseline" in x for x in plain)


def test_curves_say_when_the_training_loss_mixes_tie_less_rows(tmp_path):
    from pref_lightning.train.report import plot_curves

    metrics = {**METRICS, "train_rows": 1500, "data_counts": {"sources": [
        {"added_to_train": 400, "ties": False}, {"added_to_train": 200, "ties": True}]}}
    labels = plot_curves(tmp_path / "curves.png", read_curves(write_metrics_csv(tmp_path / "m.csv")), metrics)
    mixed = [label for label in labels if "tie-less" in label]
    assert mixed == ["train loss (per logged step); mixes 400 tie-less rows of 1500 (loss over A/B only)",
                     "train log loss (per epoch); mixes 400 tie-less rows of 1500 (loss over A/B only)"]


def test_reliability_shows_counts_and_greys_sparse_bins(tmp_path):
    # bins of 1-2 rows swung from 0 to 1 with nothing saying how few rows they held
    from pref_lightning.train.report import SPARSE_BIN, plot_reliability

    probs, labels = fake_predictions(n=200)
    drawn = plot_reliability(tmp_path / "reliability.png", probs, labels, 0.05)
    check_png(tmp_path / "reliability.png")
    _, _, counts = reliability_curve(probs.max(axis=1), probs.argmax(axis=1) == labels)
    assert drawn["counts"].tolist() == counts.tolist() and counts.sum() == 200
    assert drawn["sparse"].tolist() == (counts < SPARSE_BIN).tolist() and drawn["sparse"].any()
    assert not drawn["sparse"].all()
