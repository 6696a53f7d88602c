"""Hydra multiruns as users type them: k-fold CV with combined out-of-fold predictions, Optuna, SLURM."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pref_lightning.core.metrics import CLASS_COLUMNS, competition_log_loss

from .test_end_to_end import FAST, run

pytestmark = pytest.mark.slow


def test_kfold_multirun_combines_out_of_fold_predictions(tmp_path):
    sweep = tmp_path / "cv"
    out = run("train.py", "-m", "data.n_folds=3", "data.fold=0,1,2", "data.synthetic_rows=300",
              "trainer.max_steps=6", f"hydra.sweep.dir={sweep}", *FAST)
    folds = pd.read_csv(sweep / "0" / "folds.csv", dtype={"id": str})
    assert len(folds) == 300 and sorted(folds["fold"].unique()) == [0, 1, 2]
    for k in range(3):  # the assignment is the same in every run (seeded), each run validates its fold
        assert pd.read_csv(sweep / str(k) / "folds.csv", dtype={"id": str}).equals(folds)
        oof = pd.read_csv(sweep / str(k) / "oof.csv", dtype={"id": str})
        assert list(oof.columns) == ["id", "fold", *CLASS_COLUMNS, "label"]
        assert set(oof["id"]) == set(folds["id"][folds["fold"] == k]) and (oof["fold"] == k).all()

    combined = pd.read_csv(sweep / "oof.csv", dtype={"id": str})
    assert combined["id"].tolist() == folds["id"].tolist()  # every training id exactly once, in file order
    probs = combined[list(CLASS_COLUMNS)].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    cv = json.loads((sweep / "cv_metrics.json").read_text())[0]
    expected = competition_log_loss(torch.tensor(probs), torch.tensor(combined["label"].to_numpy()))
    assert cv["rows"] == 300 and cv["n_folds"] == 3 and cv["cv_log_loss"] == pytest.approx(float(expected), abs=1e-9)
    assert f"cross-validation over 3 folds (300 rows): log loss {cv['cv_log_loss']:.4f}" in out

    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 3 and (summary["status"] == "finished").all()
    assert sorted(summary["data.fold"].tolist()) == [0, 1, 2]
    assert summary["val_log_loss"].is_monotonic_increasing  # best first
    assert "sweep summary" in out


def test_optuna_search_runs_two_trials_and_summarises_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # in the test extra; optional for users
    sweep = tmp_path / "optuna"
    run("train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        "data.synthetic_rows=300", "trainer.max_steps=4", f"hydra.sweep.dir={sweep}", *FAST)
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and (summary["status"] == "finished").all()
    # the trials differ in the searched parameters, and Optuna saw train.py's returned metric
    assert summary["model.lr"].nunique() == 2 and summary["model.head_lr"].nunique() == 2
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {summary['val_log_loss'].min()}" in results


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout >= 1


def test_ddp_multirun_keeps_one_folder_per_run(tmp_path):
    """Lightning re-launches the script for rank 1; under a Hydra multirun that must neither start the
    sweep again nor leave folders outside the job's own."""
    sweep = tmp_path / "ddp_sweep"
    out = run("train.py", "-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "model.head_lr=1e-3,2e-3", "data.synthetic_rows=200", "trainer.max_steps=3",
              f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}/logs", *FAST)
    assert out.count("All distributed processes registered") == 2  # one DDP group per job, not more
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0", "1", "multirun.yaml", "summary.csv"]
    for job in ("0", "1"):
        assert sorted(p.name for p in (sweep / job).iterdir() if not p.name.startswith(".")) == [
            "checkpoints", "csv", "metrics.json", "plots", "report.md", "tensorboard", "tokenizer", "train.log",
            "train_ddp_process_1.log"]
    assert not (tmp_path / "logs").exists()  # no stray run folder from a rank's own Hydra run
    summary = pd.read_csv(sweep / "summary.csv")
    assert (summary["status"] == "finished").all() and sorted(summary["model.head_lr"]) == [0.001, 0.002]
