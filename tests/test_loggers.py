"""Logger configs (CSV + TensorBoard by default; W&B and MLflow optional) and the Rich progress bar."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from pref_lightning.core.runtime import instantiate_list
from pref_lightning.train.callbacks import drop_progress_bars
from pref_lightning.train.loggers import ResumableCSVLogger as CSVLogger

from .test_config import compose_train


def loggers_for(tmp_path, *overrides):
    cfg = compose_train([*overrides, f"paths.output_dir={tmp_path}"])
    return cfg, instantiate_list(cfg.logger)


def test_default_loggers_are_csv_and_tensorboard(tmp_path):
    cfg, loggers = loggers_for(tmp_path)
    assert list(cfg.logger) == ["csv", "tensorboard"]
    assert [type(lg) for lg in loggers] == [CSVLogger, TensorBoardLogger]
    assert Path(loggers[1].log_dir) == tmp_path / "tensorboard"
    loggers[1].log_metrics({"val/log_loss": 1.0}, step=0)
    loggers[1].finalize("success")
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name,cls", [("csv", CSVLogger), ("tensorboard", TensorBoardLogger)])
def test_single_logger_configs(tmp_path, name, cls):
    cfg, loggers = loggers_for(tmp_path, f"logger={name}")
    assert list(cfg.logger) == [name] and [type(lg) for lg in loggers] == [cls]


def test_wandb_config_is_offline_and_optional(tmp_path):
    cfg = compose_train(["logger=[csv,tensorboard,wandb]", f"paths.output_dir={tmp_path}"])
    assert list(cfg.logger) == ["csv", "tensorboard", "wandb"]
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.save_dir == str(tmp_path)
    assert cfg.logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (optional extra)")
    logger = instantiate(cfg.logger.wandb)
    logger.log_metrics({"val/log_loss": 1.0}, step=0)
    logger.finalize("success")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_mlflow_config_is_a_local_store_and_optional(tmp_path):
    cfg = compose_train(["logger=mlflow", f"paths.output_dir={tmp_path}"])
    assert list(cfg.logger) == ["mlflow"]
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.logger.mlflow.artifact_location == f"{tmp_path}/mlartifacts"
    assert cfg.logger.mlflow._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    if importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("mlflow is not installed (optional extra)")
    logger = instantiate(cfg.logger.mlflow)
    logger.log_metrics({"val/log_loss": 1.0}, step=0)
    logger.finalize("success")
    assert (tmp_path / "mlflow.db").is_file()


def test_rich_progress_bar_is_a_default_callback():
    cfg = compose_train()
    assert cfg.callbacks.rich_progress_bar._target_ == "pref_lightning.train.callbacks.progress_bar"
    assert cfg.trainer.enable_progress_bar is True


def test_disabled_progress_bar_drops_the_rich_bar(tmp_path):
    callbacks = instantiate_list(compose_train([f"paths.output_dir={tmp_path}"]).callbacks)
    assert any(isinstance(c, ProgressBar) for c in callbacks)  # Rich on a terminal, log lines otherwise
    with pytest.raises(Exception, match="enable_progress_bar=False"):
        L.Trainer(callbacks=callbacks, enable_progress_bar=False, logger=False)
    kept = drop_progress_bars(callbacks, enabled=False)
    assert not any(isinstance(c, ProgressBar) for c in kept) and len(kept) == len(callbacks) - 1
    trainer = L.Trainer(callbacks=kept, enable_progress_bar=False, logger=False)
    assert trainer.progress_bar_callback is None
    assert drop_progress_bars(callbacks, enabled=True) == callbacks
    trainer = L.Trainer(callbacks=callbacks, logger=False)
    assert isinstance(trainer.progress_bar_callback, ProgressBar)
