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


# ---- a rerun of some jobs into an existing sweep folder (issue 22) ----------------------------------
def _composed(*overrides):
    from hydra import compose, initialize_config_dir

    from .conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_sweep_job_goes_to_the_folder_of_its_configuration_never_over_another(tmp_path, capsys):
    from omegaconf import OmegaConf, open_dict

    from pref_lightning.train.sweep import sweep_job_subdir

    def job(num, fold, **extra):
        cfg = _composed("data.n_folds=3", f"data.fold={fold}", *(f"{k}={v}" for k, v in extra.items()))
        with open_dict(cfg):
            cfg.hydra.sweep.dir = str(tmp_path)
        return sweep_job_subdir(num, _root_=cfg), cfg

    for fold in (0, 1):  # a sweep over folds 0 and 1 that finished; fold 2's job never started
        chosen, cfg = job(fold, fold)
        assert chosen == str(fold)
        (tmp_path / chosen / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg.hydra.overrides.task, tmp_path / chosen / ".hydra" / "overrides.yaml")
        (tmp_path / chosen / "metrics.json").write_text("{}")
    assert job(0, 0)[0] == "0" and job(1, 1)[0] == "1"  # the same sweep again: each job its own folder
    capsys.readouterr()
    # `-m data.fold=2`: Hydra numbers it 0; fold 0's folder is not its own, and no folder holds fold 2
    chosen, cfg = job(0, 2)
    assert chosen == "2" and (tmp_path / "2").is_dir()
    out = capsys.readouterr().out
    assert f"job 0: {tmp_path / '0'} holds the run of another configuration (data.fold=0 there, data.fold=2 here)" \
        in out and f"this job trains in {tmp_path / '2'}, a new folder" in out
    (tmp_path / "2" / ".hydra").mkdir()
    OmegaConf.save(cfg.hydra.overrides.task, tmp_path / "2" / ".hydra" / "overrides.yaml")
    (tmp_path / "2" / "checkpoints").mkdir()
    (tmp_path / "2" / "checkpoints" / "last.ckpt").write_bytes(b"")
    # rerun fold 2 again (ckpt_path=last: its last.ckpt to resume), or fold 1 alone: the folder holding that
    # configuration, wherever Hydra numbers the job
    assert job(0, 2, ckpt_path="last")[0] == "2" and job(0, 1)[0] == "1" and job(5, 0)[0] == "0"
    # another setting (even one the checkpoint check ignores, as a sweep over it has one job per value) is
    # another configuration: a new folder, never 1
    assert job(1, 1, **{"trainer.max_epochs": 3})[0] == "3"


def test_combined_cv_files_that_no_longer_match_the_runs_are_removed(tmp_path, capsys):
    from pref_lightning.train.sweep import combine_folds

    rng = np.random.default_rng(0)
    all_ids = [f"{k}-{i}" for k in range(3) for i in range(4)]
    for fold in range(3):
        job = tmp_path / str(fold)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- data.fold={fold}\n- data.n_folds=3\n")
        probs = rng.dirichlet([1, 1, 1], size=4)
        (job / "oof.csv").write_text("id,fold,winner_model_a,winner_model_b,winner_tie,label\n" + "".join(
            f"{fold}-{i},{fold},{p[0]},{p[1]},{p[2]},0\n" for i, p in enumerate(probs)))
        (job / "folds.csv").write_text("id,fold\n" + "".join(f"{i},{i[0]}\n" for i in all_ids))
        (job / "metrics.json").write_text(json.dumps({"n_folds": 3, "fold": fold, "val_rows": 4, "val_log_loss": 1.0}))
    assert len(combine_folds(tmp_path)) == 1 and (tmp_path / "oof.csv").is_file()
    (tmp_path / "oof-1.csv").write_text("left by an earlier sweep of two groups\n")
    capsys.readouterr()
    # fold 2's folder now holds a run that has not finished: the combination describes models no longer there
    (tmp_path / "2" / "metrics.json").unlink()
    assert combine_folds(tmp_path) == []
    assert not any((tmp_path / name).exists() for name in ("oof.csv", "oof-1.csv", "cv_metrics.json"))
    assert "removed cv_metrics.json, oof-1.csv, oof.csv" in capsys.readouterr().out


def test_rerun_of_one_fold_never_overwrites_another_and_resumes_its_own(tmp_path):
    # Hydra numbers a rerun's only job 0: fold 2 trained into SWEEP/0 over fold 0's run, and with
    # ckpt_path=last resumed fold 0's finished run and scored it on fold 2's rows
    sweep = tmp_path / "cv"
    common = ["data.n_folds=3", "data.synthetic_rows=300", "trainer.max_steps=3", f"hydra.sweep.dir={sweep}", *FAST]
    run("train.py", "-m", "data.fold=0,1", *common)
    fold0 = {p.relative_to(sweep): p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file()}
    assert not (sweep / "oof.csv").exists()  # folds 0 and 1 of 3: nothing to combine yet

    out = run("train.py", "-m", "data.fold=2", "ckpt_path=last", *common)
    assert {p: (sweep / p).read_bytes() for p in fold0} == fold0  # fold 0's run untouched, .hydra/ included
    assert f"this job trains in {sweep / '2'}, a new folder" in out
    assert json.loads((sweep / "2" / "metrics.json").read_text())["fold"] == 2
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["data.fold"].tolist()) == [0, 1, 2] and len(summary) == 3
    combined = pd.read_csv(sweep / "oof.csv", dtype={"id": str})
    assert len(combined) == 300 and combined["id"].is_unique
    assert json.loads((sweep / "cv_metrics.json").read_text())[0]["n_folds"] == 3

    # fold 1 again with ckpt_path=last: job 0 resumes fold 1's own last.ckpt, in fold 1's folder
    out = run("train.py", "-m", "data.fold=1", "ckpt_path=last", *common)
    assert f"this job trains in {sweep / '1'}, the folder of its own configuration" in out
    assert f"Restoring states from the checkpoint path at {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in out
    assert {p: (sweep / p).read_bytes() for p in fold0} == fold0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2"]
