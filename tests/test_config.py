from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pref_lightning.data.datamodule import PreferenceDataModule

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_default_is_the_embedded_experiment():
    cfg = compose_train()
    assert cfg.model.backbone == "tiny"
    assert cfg.data.train_path is None and cfg.data.synthetic_rows > 0
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.callbacks.model_checkpoint.monitor == "val/log_loss"
    assert cfg.callbacks.model_checkpoint.filename == "best"


def test_full_data_composes_with_user_keys(tmp_path):
    cfg = compose_train(["experiment=full_data", f"data.train_path={tmp_path}/train.csv",
                         "model.backbone=/models/deberta-v3-small", "model.lr=1e-5", "data.max_length=512",
                         "data.batch_size=4", "trainer.max_epochs=3", "trainer.devices=2", "seed=7"])
    assert cfg.model.backbone == "/models/deberta-v3-small" and cfg.model.lr == 1e-5
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 2
    assert cfg.data.max_length == 512 and cfg.data.batch_size == 4 and cfg.data.split_seed == 7
    dm = instantiate(cfg.data)
    assert isinstance(dm, PreferenceDataModule) and dm.train_path.endswith("train.csv")


def test_full_data_defaults_to_deberta_v3_small_on_all_gpus():
    cfg = compose_train(["experiment=full_data", "data.train_path=x.csv"])
    assert cfg.model.backbone == "microsoft/deberta-v3-small"
    assert cfg.trainer.devices == -1
    assert cfg.model.head_lr > cfg.model.lr  # fresh head, pretrained backbone


def test_full_data_requires_train_path():
    cfg = compose_train(["experiment=full_data"])
    with pytest.raises(Exception, match="train_path"):
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("trainer,accelerator", [("cpu", "cpu"), ("gpu", "gpu"), ("ddp", "gpu")])
def test_trainer_group(trainer, accelerator):
    cfg = compose_train([f"trainer={trainer}"])
    assert cfg.trainer.accelerator == accelerator
    assert cfg.trainer._target_ == "lightning.Trainer"


def test_predict_config_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["ckpt_path=a.ckpt", "input_path=t.csv"])
    assert cfg.output_path == "submission.csv" and cfg.trainer.devices == 1


def test_the_two_stage_recipe_composes():
    """Stage 1 reads the text alone on the non-arena sets; stage 2 starts from its checkpoint (init_from and
    text_anchor name the same file), trains on the arena rows, and trains stage 1 first when missing."""
    stage1 = compose_train(["experiment=pairs_stage1"])
    assert not stage1.model.use_text_stats and not stage1.model.anchor_head
    assert stage1.data.train_path.endswith("autoj_pairwise_test.csv")
    assert not any("lmsys_arena" in s.path for s in stage1.data.sources)
    stage2 = compose_train(["experiment=arena_stages", "stage1.dir=/somewhere/s1"])
    assert stage2.stage1.experiment == "pairs_stage1" and list(stage2.data.sources) == []
    assert stage2.model.init_from == stage2.model.text_anchor == "/somewhere/s1/checkpoints/best.ckpt"
    assert stage2.data.max_length == stage1.data.max_length and stage2.model.backbone == stage1.model.backbone


def test_arena_small_composes():
    cfg = compose_train(["experiment=arena_small"])
    assert cfg.model.backbone == "minilm" and cfg.model.anchor_head and cfg.trainer.precision == "32-true"
    assert cfg.data.train_path.endswith("lmsys_arena_sample.csv") and cfg.data.n_folds == 5
    assert list(cfg.data.sources) == [] and cfg.model.anchor_blend == 0.5
    assert cfg.trainer.max_epochs == cfg.trainer.check_val_every_n_epoch == 2
