"""Resuming: a run killed by SIGTERM mid-epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from . import warm
from .conftest import REPO
from .test_end_to_end import FAST, run

pytestmark = pytest.mark.slow
COMMON = ["data.synthetic_rows=600", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", *FAST]


def train_killed_at(step, run_dir, *overrides):
    """train.py that receives a real SIGTERM after optimizer step `step`; returns its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = warm.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}",
                       "+callbacks.kill._target_=tests.signals.SigtermAtStep", f"+callbacks.kill.step={step}"],
                      cwd=REPO, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 143, out[-3000:]
    return out


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    run("train.py", *COMMON, f"hydra.run.dir={tmp_path}/straight")

    killed = tmp_path / "killed"
    out = train_killed_at(10, killed, *COMMON)
    assert "resume with: python train.py ckpt_path=last" in out
    assert not (killed / "metrics.json").exists()
    state = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    # saved mid-epoch 0: the loader's place in the epoch travels with the optimizer and scheduler state
    assert state["global_step"] == 10 and state["epoch"] == 0
    assert state["PreferenceDataModule"] == {"train_position": {"epoch": 0, "batches": 10}}
    assert state["optimizer_states"] and state["lr_schedulers"][0]["last_epoch"] == 10

    out = run("train.py", *COMMON, f"hydra.run.dir={killed}", "ckpt_path=last")
    assert "Restoring states from the checkpoint path" in out
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["epochs"] == straight["epochs"] == 2
    # the same batches, coins and optimizer state: equal up to float noise (observed: bit-identical)
    for key in ("val_log_loss", "val_accuracy", "val_log_loss_calibrated", "temperature"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    # the resumed run's curve still starts at step 0 (the CSV logger appended instead of starting over)
    curve = pd.read_csv(killed / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    assert curve["step"].min() == 0 and curve["step"].is_unique and curve["step"].max() > 10
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_ckpt_path_accepts_a_run_folder_and_rejects_missing_files(tmp_path, capsys):
    from omegaconf import OmegaConf

    from pref_lightning.train.resume import resume_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")

    def cfg(value, out=tmp_path / "new"):
        return OmegaConf.create({"ckpt_path": value, "paths": {"output_dir": str(out)}})

    assert resume_checkpoint(cfg(None)) is None
    assert resume_checkpoint(cfg(str(run_dir))) == str(run_dir / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(cfg("last", run_dir)) == str(run_dir / "checkpoints" / "last.ckpt")
    # `last` from a new run folder: a fresh start (never another folder's checkpoint); a sibling is named
    # only when its saved config matches (tests/test_cli.py), and this one has none
    assert resume_checkpoint(cfg("last", tmp_path / "fresh")) is None
    out = capsys.readouterr().out
    assert "starting fresh" in out and "pass it as ckpt_path" not in out
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resume_checkpoint(cfg(str(tmp_path / "nope.ckpt")))
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        resume_checkpoint(cfg(str(tmp_path / "fresh")) if (tmp_path / "fresh").mkdir() is None else None)


def test_sigterm_under_ddp_saves_once_ends_every_rank_and_resumes(tmp_path):
    ddp = [*COMMON, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1"]
    run("train.py", *ddp, f"hydra.run.dir={tmp_path}/straight")
    killed = tmp_path / "killed"
    out = train_killed_at(5, killed, *ddp)
    assert "resume with" in out
    # rank 0 saved alone (a barrier here used to hang the ranks) and ended the rank it launched
    leftovers = subprocess.run(["pgrep", "-f", f"hydra.run.dir={killed}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    run("train.py", *ddp, f"hydra.run.dir={killed}", "ckpt_path=last")
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    for key in ("val_log_loss", "val_accuracy", "temperature"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key


def test_resuming_with_more_epochs_keeps_the_lr_schedule_and_says_so(tmp_path):
    # Lightning rebuilt the schedule for the new length from the current step: the LR jumped ~28x, no word
    import json

    run_dir, log = tmp_path / "run", tmp_path / "lr.jsonl"
    common = [*COMMON, f"hydra.run.dir={run_dir}", "report=false"]
    run("train.py", *common, "trainer.max_epochs=1")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    planned, final_lrs = last["global_step"], last["lr_schedulers"][0]["_last_lr"]
    out = run("train.py", *common, "trainer.max_epochs=2", "ckpt_path=last",
              "+callbacks.lr_log._target_=tests.signals.LrLog", f"+callbacks.lr_log.path={log}")
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert resumed[0]["step"] == planned and len(resumed) == planned  # the second epoch's steps
    for lrs in (r["lrs"] for r in resumed):  # no jump: the original schedule's final LRs (0 at its end)
        assert all(lr <= final + 1e-12 for lr, final in zip(lrs, final_lrs)), (lrs, final_lrs)
    warning = [line for line in out.splitlines() if "resumed with" in line]
    assert len(warning) == 1 and f"where the run began with {planned}:" in warning[0]
    assert f"the LR schedule continues over the original {planned} steps" in warning[0]
    assert last["callbacks"]["ScheduleGuard"]["planned_steps"] == planned  # recorded in last.ckpt


# ---- a run folder or last.ckpt is continued only by its own configuration (issue 22) ----------------
def composed(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_last_ckpt_resumes_only_into_the_configuration_it_was_trained_with(tmp_path):
    # a sweep rerun of fold 2 that landed in fold 0's folder resumed fold 0's finished run and scored it on
    # fold 2's rows (its training rows): leakage into the CV, without a word
    from omegaconf import OmegaConf, open_dict

    from pref_lightning.core.errors import UserError
    from pref_lightning.train.resume import RunIdentity, resume_checkpoint, run_identity

    fold0 = composed("data.n_folds=3", "data.fold=0")
    run_dir = tmp_path / "0"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"RunIdentity": RunIdentity(run_identity(fold0)).state_dict()}}, last)

    def resuming(*overrides, ckpt="last"):
        cfg = composed("data.n_folds=3", *overrides)
        with open_dict(cfg):
            cfg.ckpt_path, cfg.paths = ckpt, OmegaConf.create({"output_dir": str(run_dir)})
        return cfg

    assert resume_checkpoint(resuming("data.fold=0")) == str(last)
    # what only says where or how fast a run reads does not make it another run
    assert resume_checkpoint(resuming("data.fold=0", "data.num_workers=2", "data.eval_batch_size=8")) == str(last)
    for ckpt in ("last", str(run_dir), str(last)):  # every way ckpt_path names it
        with pytest.raises(UserError, match=r"data\.fold=0 there, data\.fold=2 here"):
            resume_checkpoint(resuming("data.fold=2", ckpt=ckpt))
    with pytest.raises(UserError, match=r"model\.head_hidden=256 there, model\.head_hidden=32 here"):
        resume_checkpoint(resuming("data.fold=0", "model.head_hidden=32"))
    with pytest.raises(UserError, match=r"seed=42 there, seed=7 here"):
        resume_checkpoint(resuming("data.fold=0", "seed=7"))


def test_a_run_folder_of_another_configuration_is_refused_before_hydra_writes_into_it(tmp_path, capsys):
    from omegaconf import OmegaConf

    from pref_lightning.train.resume import check_run_folder

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(composed("data.n_folds=3", "data.fold=0"), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.json").write_text("{}")
    conf = REPO / "conf"
    check_run_folder(["data.n_folds=3", "data.fold=0", f"hydra.run.dir={run_dir}", "ckpt_path=last",
                      "trainer.max_epochs=3"], conf)  # its own settings: a resume, allowed
    check_run_folder(["data.fold=2", f"hydra.run.dir={tmp_path}/new"], conf)  # a new folder
    check_run_folder(["-m", "data.fold=2", f"hydra.run.dir={run_dir}"], conf)  # multirun: sweep.py chooses
    with pytest.raises(SystemExit) as exit_:
        check_run_folder(["data.n_folds=3", "data.fold=2", f"hydra.run.dir={run_dir}", "ckpt_path=last"], conf)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: hydra.run.dir={run_dir} holds the run of another")
    assert "data.fold=0 there, data.fold=2 here" in err[0] and "another hydra.run.dir" in err[0]
    (run_dir / "metrics.json").unlink()  # a folder holding no checkpoint and no metrics holds nothing to lose
    check_run_folder(["data.n_folds=3", "data.fold=2", f"hydra.run.dir={run_dir}"], conf)


def test_single_run_into_another_configurations_folder_exits_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", "data.synthetic_rows=200", "trainer.max_steps=2", "report=false", f"hydra.run.dir={run_dir}",
        *FAST)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"}
    result = warm.run([sys.executable, "train.py", "data.synthetic_rows=200", "seed=3",
                       f"hydra.run.dir={run_dir}", "ckpt_path=last", *FAST], cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: hydra.run.dir={run_dir} holds the run of another configuration (seed=42 there, seed=3 here); "
        "train this one in a new folder (another hydra.run.dir), or pass that run's own settings to continue it"]
    assert {p: p.read_bytes() for p in before} == before  # nothing written, .hydra/ included


def test_resuming_a_moved_run_folder_never_replaces_a_better_best_ckpt(tmp_path):
    # last.ckpt stores ModelCheckpoint's absolute dirpath; elsewhere Lightning dropped best_model_score
    # (Lightning #12045), so the first validation after the resume became "best" however bad it was
    import shutil

    first = tmp_path / "first"
    common = ["data.synthetic_rows=300", "report=false", *FAST]
    run("train.py", *common, "trainer.max_epochs=1", f"hydra.run.dir={first}")
    best = torch.load(first / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    kept = json.loads((first / "metrics.json").read_text())["val_log_loss"]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)  # a bigger disk, a cluster, a Kaggle dataset: the folder is self-contained

    # the next epoch is made far worse (noise on the head): best.ckpt must stay the first epoch's model
    out = run("train.py", *common, "trainer.max_epochs=2", f"hydra.run.dir={moved}", "ckpt_path=last",
              "+callbacks.spoil._target_=tests.signals.SpoilHead")
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["best_checkpoint"] == str(moved / "checkpoints" / "best.ckpt")
    assert metrics["val_log_loss"] == pytest.approx(kept, abs=1e-6)
    after = torch.load(moved / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert after.keys() == best.keys() and all(torch.equal(after[k], best[k]) for k in best)
    # the spoilt epoch was validated and was worse (else this test shows nothing)
    curve = pd.read_csv(moved / "csv" / "metrics.csv").dropna(subset=["val/log_loss"])
    assert curve["val/log_loss"].max() > kept + 0.05
    assert "resumed in a moved run folder" in out
