"""A user's mistakes read as one line (exit status 2), nothing is left behind, little noise."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pref_lightning.core import cli
from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.data.records import FLOAT_FORMAT, DataError
from pref_lightning.data.submission import submission_frame
from pref_lightning.model.checkpoint import load_checkpoint
from pref_lightning.model.compat import check_hardware
from pref_lightning.train.callbacks import LogProgress
from pref_lightning.train.prior_guard import advice
from pref_lightning.train.resume import resume_checkpoint, same_config_runs

from . import warm
from .conftest import REPO


def run(script, *overrides, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return warm.run([sys.executable, str(REPO / script), *overrides], cwd=cwd, env=env, timeout=300)


def compose_cfg(name, overrides=()):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


# ---- one line, exit status 2 -------------------------------------------------------------------
def test_user_errors_are_value_errors_and_file_not_found_errors():
    assert issubclass(UserError, ValueError) and issubclass(DataError, UserError)
    assert issubclass(MissingFileError, UserError) and issubclass(MissingFileError, FileNotFoundError)


def test_run_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def mistake():
        raise DataError("train.csv: missing column(s) winner_tie")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(mistake)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: train.csv: missing column(s) winner_tie\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError):
        cli.run(mistake)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(lambda: {}["x"])


@pytest.mark.slow
def test_predict_on_a_report_says_not_a_checkpoint_and_leaves_nothing(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# training report\n")
    done = run("predict.py", f"ckpt_path={report}", "input_path=test.csv", cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {report}: not a pref-lightning checkpoint "
                                                "(not a PyTorch checkpoint file)"]
    assert "weights_only" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no outputs/predict/runs/<time>
    full = run("predict.py", f"ckpt_path={report}", "input_path=test.csv", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "not a pref-lightning checkpoint" in full.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can run experiment=full_data")
def test_gpu_experiment_on_cpu_names_the_override_and_removes_its_run_folder(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    done = run("train.py", "experiment=full_data", "data.train_path=train.csv", f"hydra.run.dir={run_dir}",
               cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert line.startswith("error: experiment=full_data and trainer=ddp asks for GPUs") and "\n" not in line
    assert "trainer=cpu" in line and "trainer.accelerator=cpu trainer.devices=2" in line
    assert not (tmp_path / "outputs").exists()  # the failed run's folder (.hydra, train.log) is gone


@pytest.mark.slow
def test_a_fold_without_n_folds_is_one_line_and_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    done = run("train.py", "data.fold=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: data.fold=1 needs data.n_folds (the number of folds, e.g. data.n_folds=5): without it validation "
        "is the data.val_fraction split, the same for every data.fold"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_typo_in_an_override_key_is_one_line_and_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "typo"
    done = run("train.py", "data.max_lenght=256", f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: unknown setting data.max_lenght; did you mean data.max_length?"]
    assert list(tmp_path.iterdir()) == []  # no run folder, no outputs/
    done = run("predict.py", "ckpt_path=x.ckpt", "input_path=test.csv", "batch_sizee=3", cwd=tmp_path,
               env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: unknown setting batch_sizee; did you mean batch_size?"]


def test_unknown_override_keys_checks_keys_not_groups_sweeps_or_additions():
    overrides = ["data.max_lenght=256", "model.lrr=1,2", "model.lr=1e-4,2e-4", "experiment=full_data", "trainer=cpu",
                 "logger=[csv,tensorboard]", "hydra.run.dir=runs/x", "+data.extra=1", "~seed",
                 "data.train_path=train.csv", "callbacks.prior_guard.patience=3"]
    assert cli.unknown_override_keys("train", overrides) == [("data.max_lenght", ["data.max_length"]),
                                                             ("model.lrr", ["model.lr"])]
    # the keys a config group brings count: experiment=llm_lora's model has model.lora.r
    assert cli.unknown_override_keys("train", ["experiment=llm_lora", "model.lora.r=4"]) == []
    assert cli.unknown_override_keys("train", ["model.lora.r=4"])[0][0] == "model.lora.r"
    assert cli.unknown_override_keys("train", ["model.tiny_config.hidden_size=32"]) == []  # the default model's
    assert cli.unknown_override_keys("train", ["data.unheard_of_key=1"]) == [("data.unheard_of_key", [])]


def test_a_settings_error_raised_inside_instantiate_is_one_line(capsys, monkeypatch):
    # `+data.max_lenght=256` (Hydra's advice for a typo) reaches the data module's constructor, whose
    # UserError Hydra wraps in "Error in call to target": still one line, exit 2
    from hydra.errors import InstantiationException

    from pref_lightning.data.contract import EncodingSpec

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def mistake():
        try:
            EncodingSpec.from_dict({"max_lenght": 256}, where="data")
        except UserError as err:
            raise InstantiationException("Error in call to target 'PreferenceDataModule'") from err

    with pytest.raises(SystemExit) as exit_info:
        cli.run(mistake)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data: unknown encoding setting(s) max_lenght; did you mean max_length? known: ")
    assert err.count("\n") == 1


@pytest.mark.slow
def test_a_hub_backbone_without_the_hub_is_one_line_at_once(tmp_path, synthetic_csv):
    # experiment=full_data names microsoft/deberta-v3-small: offline and not cached, transformers retried for
    # 28 s and ended in an OSError traceback, leaving a run folder
    run_dir = tmp_path / "runs" / "offline"
    started = time.perf_counter()
    done = run("train.py", "experiment=full_data", "trainer=cpu", f"data.train_path={synthetic_csv}",
               f"hydra.run.dir={run_dir}", cwd=tmp_path,
               env={"HYDRA_FULL_ERROR": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf_cache")})
    elapsed = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.backbone=microsoft/deberta-v3-small is a hub name"), lines
    assert "model.backbone=/local/dir" in lines[0] and "model=minilm" in lines[0]
    assert not (tmp_path / "runs").exists()
    assert "Traceback" not in done.stdout + done.stderr and elapsed < 60  # imports only, no retries


def test_check_hub_backbone_passes_local_folders_and_refuses_an_uncached_name_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pref_lightning.model.backbone import check_hub_backbone

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    check_hub_backbone("tiny")
    check_hub_backbone(str(tmp_path))  # a local folder: nothing to fetch
    with pytest.raises(UserError, match=r"model.backbone=org/some-model is a hub name, not in the local"):
        check_hub_backbone("org/some-model")


def test_the_suggested_cpu_overrides_compose():
    for overrides in (["trainer=cpu"], ["trainer.accelerator=cpu", "trainer.devices=2"]):
        cfg = compose_cfg("train", ["experiment=full_data", "data.train_path=x.csv", *overrides])
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "bf16-mixed"
        check_hardware(cfg)


def test_precision_on_cpu(capsys, monkeypatch):
    from pref_lightning.model import compat

    with pytest.raises(UserError, match="trainer.precision=16-true on CPU.*mixed dtype"):
        check_hardware(compose_cfg("train", ["trainer.accelerator=cpu", "trainer.precision=16-true"]))
    monkeypatch.setattr(compat, "cpu_has_native_bf16", lambda: True)
    assert check_hardware(compose_cfg("train", ["trainer.accelerator=cpu", "trainer.precision=16-mixed"])) \
        == {"precision": "bf16-mixed"}
    assert "16-mixed on CPU runs bf16-mixed" in capsys.readouterr().out
    assert check_hardware(compose_cfg("train", ["trainer.accelerator=cpu"])) == {}  # native bf16: kept
    # emulated bf16 (~60x slower per matmul here) runs as fp32, said in one line
    monkeypatch.setattr(compat, "cpu_has_native_bf16", lambda: False)
    assert check_hardware(compose_cfg("train", ["trainer.accelerator=cpu"])) == {"precision": "32-true"}
    assert "running 32-true instead" in capsys.readouterr().out
    assert check_hardware(compose_cfg("train", ["trainer.accelerator=cpu", "trainer.precision=32"])) == {}


def test_remove_if_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "train" / "runs" / "t"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "train.log").write_text("")
    kept = tmp_path / "outputs" / "train" / "runs" / "other"
    (kept / "checkpoints").mkdir(parents=True)
    assert cli.remove_if_empty(run_dir) and not run_dir.exists() and kept.exists()
    assert not cli.remove_if_empty(kept) and kept.exists()  # holds more than logs
    assert not cli.remove_if_empty(tmp_path)  # never the working folder


# ---- checkpoints ---------------------------------------------------------------------------------
def test_not_a_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path):
    cases = {"report.md": b"# report\n", "empty.ckpt": b"", "plain.ckpt": None}
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"{name}: not a pref-lightning checkpoint") as info:
            load_checkpoint(tmp_path / name)
        assert "weights_only=False" not in str(info.value)
    with pytest.raises(MissingFileError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def _cfg_for(run_dir, overrides=()):
    cfg = compose_cfg("train", [f"paths.output_dir={run_dir}", *overrides])
    return cfg


def test_resume_ckpt_path_checks(tmp_path, capsys):
    (tmp_path / "report.md").write_text("# report\n")
    with pytest.raises(UserError, match="report.md: not a pref-lightning checkpoint"):
        resume_checkpoint(_cfg_for(tmp_path / "new", [f"ckpt_path={tmp_path / 'report.md'}"]))


def test_ckpt_path_last_suggests_only_a_run_of_the_same_config(tmp_path, capsys):
    from omegaconf import OmegaConf

    def saved_run(name, overrides):
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
        (folder / ".hydra").mkdir()
        OmegaConf.save(compose_cfg("train", overrides), folder / ".hydra" / "config.yaml")
        return folder

    same = saved_run("same", ["model.lr=5e-4"])
    time.sleep(0.01)
    saved_run("other_backbone", ["experiment=full_data", "data.train_path=x.csv"])  # newer, unrelated
    cfg = _cfg_for(tmp_path / "new", ["model.lr=5e-4", "ckpt_path=last"])
    assert same_config_runs(cfg, tmp_path / "new") == [same]
    assert resume_checkpoint(cfg) is None
    out = capsys.readouterr().out
    assert "starting fresh" in out and f"{same} (pass it as ckpt_path)" in out and "other_backbone" not in out
    resume_checkpoint(_cfg_for(tmp_path / "new", ["model.lr=1e-3", "ckpt_path=last"]))
    out = capsys.readouterr().out
    assert "starting fresh" in out and "pass it as ckpt_path" not in out



# ---- configs saved before the wings layout (0.1: one flat package) -----------------------------------
def test_an_old_layout_target_is_rewritten_and_every_old_module_exists_today():
    import importlib

    assert cli.current_target("pref_lightning.module.PreferenceModule") == "pref_lightning.model.module.PreferenceModule"
    assert cli.current_target("pref_lightning.callbacks.SigtermCheckpoint") == \
        "pref_lightning.train.callbacks.SigtermCheckpoint"
    assert cli.current_target("pref_lightning.model.module.PreferenceModule") == \
        "pref_lightning.model.module.PreferenceModule"  # today's name unchanged
    assert cli.current_target("lightning.Trainer") == "lightning.Trainer"
    for old, new in cli.MOVED_MODULES.items():
        assert importlib.util.find_spec(f"pref_lightning.{new}") is not None, (old, new)
    nested = {"model": {"_target_": "pref_lightning.module.PreferenceModule", "lr": 1},
              "callbacks": [{"_target_": "pref_lightning.prior_guard.PriorGuard"}]}
    assert cli.current_targets(nested) == {"model": {"_target_": "pref_lightning.model.module.PreferenceModule", "lr": 1},
                                           "callbacks": [{"_target_": "pref_lightning.train.prior_guard.PriorGuard"}]}


def test_an_old_layout_target_in_a_config_is_one_line_naming_the_new_module(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    done = run("train.py", "model._target_=pref_lightning.module.PreferenceModule", "data.synthetic_rows=60",
               f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": ""})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: _target_ pref_lightning.module.PreferenceModule") and \
        "pref_lightning.model.module.PreferenceModule" in last
    assert "Traceback" not in done.stderr + done.stdout


def test_ckpt_path_last_finds_a_run_whose_saved_config_has_old_layout_targets(tmp_path):
    from omegaconf import OmegaConf

    folder = tmp_path / "old"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / ".hydra").mkdir()
    saved = OmegaConf.to_container(compose_cfg("train", ["model.lr=5e-4"]), resolve=False)
    saved["model"]["_target_"] = "pref_lightning.module.PreferenceModule"
    saved["data"]["_target_"] = "pref_lightning.datamodule.PreferenceDataModule"
    OmegaConf.save(OmegaConf.create(saved), folder / ".hydra" / "config.yaml")
    assert same_config_runs(_cfg_for(tmp_path / "new", ["model.lr=5e-4", "ckpt_path=last"]), tmp_path / "new") == [folder]

# ---- PriorGuard's advice -------------------------------------------------------------------------
def test_prior_guard_advises_only_changes():
    synthetic = SimpleNamespace(train_path=None)
    bf16 = SimpleNamespace(precision="bf16-mixed", datamodule=SimpleNamespace(train_path="train.csv"), max_epochs=2)
    tips = "\n".join(advice(bf16, {"backbone_dropout": 0.0, "head_dropout": 0.0}))
    assert "bf16" not in tips and "dropout" not in tips and "experiment=full_data" not in tips
    assert "data.sources" in tips and "trainer.max_epochs, now 2" in tips
    fp16 = SimpleNamespace(precision="16-mixed", datamodule=synthetic, max_epochs=1)
    tips = "\n".join(advice(fp16, {"backbone_dropout": None, "head_dropout": 0.1}))
    assert "trainer.precision=bf16-mixed" in tips and "experiment=full_data" in tips
    assert "model.backbone_dropout=0.0, model.head_dropout=0.0" in tips


# ---- progress lines without a terminal -----------------------------------------------------------
def test_log_progress_lines(caplog):
    bar = LogProgress(every_s=0.0)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, world_size=2, current_epoch=0,
                              num_training_batches=4, max_epochs=1, max_steps=-1)
    bar._trainer = trainer
    with caplog.at_level("INFO", logger="pref_lightning.train.callbacks"):
        bar.on_train_epoch_start(trainer, None)
        for i in range(2):
            bar.on_train_batch_end(trainer, None, None, {"index": torch.arange(8)}, i)
        bar.on_train_epoch_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("epoch 0: batch 1/4 (25%),") and "rows/s, ETA" in lines[0]
    assert lines[-1].startswith("epoch 0: 2 batches in ")


def test_progress_bar_is_rich_on_a_terminal_only(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from pref_lightning.train.callbacks import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(), LogProgress)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(), RichProgressBar)


# ---- noise and formats ---------------------------------------------------------------------------
def test_quiet_library_noise_drops_only_the_listed_messages(caplog):
    import logging

    cli.quiet_library_noise()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.propagate, before = True, logger.propagate
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
            logger.info("GPU available: False, used: False")
    finally:
        logger.propagate = before
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        cli.quiet_library_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
    assert not caught


def test_single_model_and_ensemble_submissions_share_one_text_format():
    probs = np.array([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    for values in (probs.astype(np.float32), probs):  # one model (float32 logits) / an ensemble (float64)
        text = submission_frame(["a", "b"], values).to_csv(index=False, float_format=FLOAT_FORMAT)
        cells = [cell for line in text.splitlines()[1:] for cell in line.split(",")[1:]]
        assert all(len(cell.lstrip("0.")) <= 8 for cell in cells) and np.allclose(np.float64(cells), probs.ravel())


def test_cv_metrics_name_calibrated_and_uncalibrated(tmp_path):
    from pref_lightning.train.sweep import combine_folds

    rng = np.random.default_rng(0)
    for fold in range(2):
        job = tmp_path / str(fold)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- data.fold={fold}\n- data.n_folds=2\n")
        ids = [f"{fold}-{i}" for i in range(5)]
        probs = rng.dirichlet([1, 1, 1], size=5)
        lines = ["id,fold,winner_model_a,winner_model_b,winner_tie,label"]
        lines += [f"{i},{fold},{p[0]},{p[1]},{p[2]},{fold}" for i, p in zip(ids, probs)]
        (job / "oof.csv").write_text("\n".join(lines) + "\n")
        (job / "metrics.json").write_text(json.dumps({"n_folds": 2, "fold": fold, "val_rows": 5,
                                                      "val_log_loss": 1.0 + fold, "val_log_loss_calibrated": 0.9}))
    all_ids = [f"{k}-{i}" for k in range(2) for i in range(5)]
    for fold in range(2):
        (tmp_path / str(fold) / "folds.csv").write_text("id,fold\n" + "".join(f"{i},{i[0]}\n" for i in all_ids))
    [result] = combine_folds(tmp_path)
    assert result["calibrated"] and result["cv_log_loss"] == result["cv_log_loss_calibrated"]
    assert result["fold_log_losses_uncalibrated"] == [1.0, 2.0] and result["cv_log_loss_uncalibrated"] == 1.5
    assert result["fold_log_losses_calibrated"] == [0.9, 0.9] and "fold_log_losses" not in result
    assert Path(tmp_path / "cv_metrics.json").is_file()
