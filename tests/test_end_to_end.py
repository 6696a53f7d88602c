"""Real runs of train.py and predict.py as a user types them (subprocesses, tiny offline models)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.data.records import ORACLE_COLUMNS

from . import warm
from .conftest import ARENA_SAMPLE, REPO, TEST_TINY_OVERRIDES, needs_shared_data

pytestmark = pytest.mark.slow
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.max_length=48",
        "data.batch_size=16", *TEST_TINY_OVERRIDES]


def run(script, *overrides, timeout=600, env=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    result = warm.run([sys.executable, script, *overrides], cwd=REPO, env=env, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def check_submission(path, expected_ids):
    sub = pd.read_csv(path, dtype={"id": str})
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert sub["id"].tolist() == list(expected_ids)
    probs = sub[list(CLASS_COLUMNS)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    return probs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = run("train.py", "data.synthetic_rows=600", f"hydra.run.dir={run_dir}", *FAST)
    return run_dir, out


def test_train_writes_checkpoint_and_metrics(trained_run):
    run_dir, out = trained_run
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val_log_loss", "val_accuracy", "prior_log_loss", "oracle_log_loss"):
        assert np.isfinite(metrics[key])
    assert metrics["oracle_log_loss"] < metrics["prior_log_loss"]
    assert metrics["train_rows"] + metrics["val_rows"] == 600
    # calibration: the temperature is fitted on validation, stored in the checkpoint, never worse
    assert metrics["temperature"] > 0
    assert metrics["val_log_loss_calibrated"] <= metrics["val_log_loss_uncalibrated"] + 1e-9
    import torch

    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    payload = best["pref_lightning"]
    assert payload["temperature"] == metrics["temperature"]
    spec = best["hyper_parameters"]["spec"]  # the encoding contract travels in the hyperparameters
    assert len(spec["stats_norm"]["mean"]) == len(spec["stats_features"]) == 16
    assert spec["stats_norm"]["version"] == 2  # bounded statistics
    assert metrics["val_log_loss_uncalibrated"] == pytest.approx(metrics["val_log_loss"], abs=1e-5)  # one pass
    # best.ckpt is the prediction artifact (no optimizer state); last.ckpt the full state to resume from
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and last["optimizer_states"] and last["lr_schedulers"]
    assert (run_dir / "checkpoints" / "best.ckpt").stat().st_size < 0.6 * (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    assert str(run_dir / "checkpoints" / "best.ckpt") in out and "metrics.json" in out
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # default loggers: csv + tensorboard


def test_train_writes_report(trained_run):
    run_dir, out = trained_run
    report = (run_dir / "report.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"report: {run_dir / 'report.md'}" in out
    for name in ("curves", "reliability", "confusion", "probabilities"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"](plots/{name}.png)" in report
    assert f"| train | {metrics['train_rows']} |" in report and f"| validation | {metrics['val_rows']} |" in report
    assert f"| {metrics['val_log_loss']:.4f} |" in report and f"| {metrics['prior_log_loss']:.4f} |" in report
    assert f"{metrics['wall_seconds']:.1f} s" in report
    assert "synthetic_rows: 600" in report  # the resolved config


def test_predict_in_input_order_without_labels(trained_run, tmp_path, synthetic_frame):
    run_dir, _ = trained_run
    test = synthetic_frame.drop(columns=list(CLASS_COLUMNS) + list(ORACLE_COLUMNS)).sample(frac=1, random_state=0)
    test_path = tmp_path / "test.csv"
    test.to_csv(test_path, index=False)
    output = tmp_path / "sub" / "submission.csv"
    args = [f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={test_path}",
            "trainer.enable_progress_bar=false", f"cache_dir={tmp_path}/cache"]
    run("predict.py", *args, f"output_path={output}", f"hydra.run.dir={tmp_path}/pred")
    first = check_submission(output, test["id"].astype(str).tolist())
    # the tokenized rows were cached; a second prediction loads them and gives the same numbers
    cached = list((tmp_path / "cache").glob("pairs-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run("predict.py", *args, f"output_path={tmp_path}/again.csv", f"hydra.run.dir={tmp_path}/pred2")
    assert cached[0].stat().st_mtime_ns == stamp
    assert np.allclose(check_submission(tmp_path / "again.csv", test["id"].astype(str).tolist()), first, atol=1e-6)


def test_ddp_prediction_writes_every_id_once_and_matches_single_process(trained_run, tmp_path, synthetic_frame):
    run_dir, _ = trained_run
    test = synthetic_frame.drop(columns=list(CLASS_COLUMNS)).iloc[:203]  # odd count: uneven shards
    test_path = tmp_path / "test.csv"
    test.to_csv(test_path, index=False)
    common = [f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={test_path}",
              "trainer.enable_progress_bar=false", "batch_size=16", "trainer.accelerator=cpu"]
    run("predict.py", *common, f"output_path={tmp_path}/single.csv", f"hydra.run.dir={tmp_path}/p1")
    run("predict.py", *common, f"output_path={tmp_path}/ddp.csv", f"hydra.run.dir={tmp_path}/p2",
        "trainer.devices=2", "trainer.strategy=ddp")
    ids = test["id"].astype(str).tolist()
    single = check_submission(tmp_path / "single.csv", ids)
    ddp = check_submission(tmp_path / "ddp.csv", ids)
    # ranks batch (and so pad) rows differently; under bf16 autocast that moves probabilities a little
    assert np.abs(single - ddp).max() < 5e-3


@needs_shared_data()
def test_predict_real_arena_rows(trained_run, tmp_path):
    run_dir, _ = trained_run
    arena = pd.read_csv(ARENA_SAMPLE, dtype=str, keep_default_na=False)
    test_path = tmp_path / "arena_test.csv"
    arena.drop(columns=list(CLASS_COLUMNS)).to_csv(test_path, index=False)
    output = tmp_path / "submission.csv"
    run("predict.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={test_path}",
        f"output_path={output}", f"hydra.run.dir={tmp_path}/pred", "trainer.enable_progress_bar=false",
        "batch_size=64")
    check_submission(output, arena["id"].tolist())


def test_full_data_experiment_with_local_backbone(tmp_path, local_backbone_dir, synthetic_csv):
    """The competition config's code path (hub-style folder, bf16, DDP strategy) on CPU."""
    run_dir = tmp_path / "full"
    run("train.py", "experiment=full_data", f"data.train_path={synthetic_csv}", f"model.backbone={local_backbone_dir}",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.limit_train_batches=4", "trainer.max_epochs=1", "trainer.val_check_interval=1.0",
        "data.num_workers=0", "data.max_length=48", "trainer.enable_progress_bar=false",
        "model.head_hidden=16", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backbone"] == str(local_backbone_dir)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_ddp_two_processes_on_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    out = run("train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "data.synthetic_rows=300", f"hydra.run.dir={run_dir}", *FAST)
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_rows"] + metrics["val_rows"] == 300 and np.isfinite(metrics["val_log_loss"])
    # one run folder: the second rank adds only its log file, no stray folders
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "csv", "metrics.json", "plots", "report.md", "tensorboard", "tokenizer", "train.log",
        "train_ddp_process_1.log"]
    # the report covers every validation row, not only rank 0's share
    assert f"({metrics['val_rows']} rows scored)" in (run_dir / "report.md").read_text()


def test_cross_layout_trains_and_predicts(tmp_path, synthetic_frame):
    run_dir = tmp_path / "cross"
    run("train.py", "data.layout=cross", "data.synthetic_rows=300", f"hydra.run.dir={run_dir}", *FAST)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # a model no better than the class prior, or worse than uniform, fails (measured 2026-12-04 on 2 CPU cores:
    # gain_over_uniform 0.065, gain_over_prior 0.058, no warnings)
    assert metrics["gain_over_uniform"] > 0.03 and metrics["gain_over_prior"] > 0.03 and not metrics["warnings"], metrics
    test = synthetic_frame.drop(columns=list(CLASS_COLUMNS)).iloc[:50]
    test.to_csv(tmp_path / "test.csv", index=False)
    run("predict.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={tmp_path}/test.csv",
        f"output_path={tmp_path}/sub.csv", f"hydra.run.dir={tmp_path}/p", "trainer.enable_progress_bar=false")
    check_submission(tmp_path / "sub.csv", test["id"].astype(str).tolist())


def test_ddp_training_matches_single_process(tmp_path):
    """2 ranks x 1 batch per step == 1 process accumulating 2 batches per step: the same global
    batches (the sampler deals batch 2k to rank 0 and 2k+1 to rank 1), the same averaged gradient.
    fp32 and deterministic swap augmentation, so only float summation order differs."""
    common = ["data.synthetic_rows=400", "trainer.precision=32", "model.swap_augment=full",
              "trainer.accelerator=cpu", "trainer.max_epochs=2", *FAST, "data.batch_size=8"]
    run("train.py", *common, "trainer.devices=1", "trainer.accumulate_grad_batches=2",
        "trainer.limit_train_batches=16", f"hydra.run.dir={tmp_path}/single")
    run("train.py", *common, "trainer=ddp", "trainer.devices=2", "trainer.limit_train_batches=8",
        f"hydra.run.dir={tmp_path}/ddp")
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert single["train_rows"] == ddp["train_rows"] and single["val_rows"] == ddp["val_rows"]
    # 16 optimizer steps from the same initial weights: differences stay at float rounding level
    for key in ("val_log_loss", "val_log_loss_calibrated", "temperature"):
        assert abs(single[key] - ddp[key]) < 2e-4, (key, single[key], ddp[key])
    assert single["val_accuracy"] == pytest.approx(ddp["val_accuracy"], abs=1.0 / single["val_rows"] + 1e-9)
    # and the model did move away from its initial prediction (not equal merely because nothing trained)
    assert abs(single["val_log_loss"] - single["prior_log_loss"]) > 1e-3


@pytest.fixture(scope="module")
def fold_run_32(tmp_path_factory, synthetic_csv):
    """A fold-0-of-2 run trained and validated in 32-true (its oof.csv: what the run computed)."""
    run_dir = tmp_path_factory.mktemp("fold32")
    out = run("train.py", f"data.train_path={synthetic_csv}", "data.n_folds=2", "trainer.precision=32-true",
              f"hydra.run.dir={run_dir}", *FAST)
    return run_dir, out


def test_predict_uses_the_checkpoints_training_precision(fold_run_32, tmp_path, synthetic_csv):
    # predict.py ran bf16 autocast (its config default) on a checkpoint trained in 32-true: its
    # probabilities differed from the run's own oof.csv by up to 1.2e-3 on a CPU with native bf16
    run_dir, _ = fold_run_32
    import torch

    assert torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["pref_lightning"]["precision"] == "32-true"
    out = run("predict.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={synthetic_csv}",
              f"output_path={tmp_path}/sub.csv", "trainer.enable_progress_bar=false")
    assert "[pref-lightning] precision 32-true: the checkpoint's training precision" in out
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str}).set_index("id")
    sub = pd.read_csv(tmp_path / "sub.csv", dtype={"id": str}).set_index("id").loc[oof.index]
    assert np.abs(sub[list(CLASS_COLUMNS)].to_numpy() - oof[list(CLASS_COLUMNS)].to_numpy()).max() < 1e-6
    # an explicit trainer.precision wins, and the line says so
    out = run("predict.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"input_path={synthetic_csv}",
              f"output_path={tmp_path}/sub2.csv", "trainer.enable_progress_bar=false", "trainer.precision=32")
    assert "[pref-lightning] precision 32: trainer.precision given" in out


def test_metrics_json_says_how_the_run_ran(fold_run_32):
    run_dir, _ = fold_run_32
    info = json.loads((run_dir / "metrics.json").read_text())["run_info"]
    assert info["precision"] == "32-true"
    assert set(info) >= {"date", "precision", "git_commit", "versions", "machine", "command", "predict_command"}
    assert info["date"].endswith("Z") and info["command"].startswith("python train.py ")
    assert "trainer.precision=32-true" in info["command"]
    for name in ("torch", "lightning", "transformers"):
        assert info["versions"][name]
    assert info["git_commit"] is None or len(info["git_commit"].split("+")[0]) == 40
    machine = info["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and isinstance(machine["cpu_native_bf16"], bool)
    assert isinstance(machine["gpus"], list)
    report = (run_dir / "report.md").read_text()
    assert "Precision actually used: 32-true;" in report and info["predict_command"] in report
    assert info["predict_command"] == (f"python predict.py ckpt_path={(run_dir / 'checkpoints' / 'best.ckpt').resolve()} "
                                       "input_path=test.csv output_path=submission.csv")
