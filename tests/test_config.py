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
    # issue 21's embedded recipe (benchmarks/results/synthetic_gap.json, variant `after`): one layer with absolute
    # positions, 40,000 rows in batches of 64, the Davidson head, lr 6e-3
    assert cfg.data.synthetic_rows == 40000 and cfg.data.batch_size == 64
    assert cfg.model.tiny_config.num_hidden_layers == 1 and not cfg.model.tiny_config.relative_attention
    assert cfg.model.symmetric_head == "davidson" and cfg.model.lr == cfg.model.head_lr == 6e-3
    assert cfg.model.interaction == "prompt_answer_embeddings" and cfg.model.relevance_weight == 0.2
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
    assert list(cfg.data.sources) == [] and cfg.model.anchor_blend == 0.5 and cfg.model.lr == 1e-5
    assert cfg.trainer.max_epochs == cfg.trainer.check_val_every_n_epoch == 2


def test_arena_pseudo_is_arena_small_plus_a_pool_labelled_by_its_own_teacher_run():
    """experiment=arena_pseudo: arena_small with the Auto-J pairs as a source whose teacher is a stage trained
    first into RUN/teacher: arena_small itself on the same folds, split and seed, the trained model alone."""
    small = compose_train(["experiment=arena_small"])
    cfg = compose_train(["experiment=arena_pseudo", "paths.output_dir=/runs/p", "data.fold=3", "seed=7"])
    stage = OmegaConf.to_container(cfg.stage1, resolve=True)
    assert stage["experiment"] == "arena_small" and stage["dir"] == "/runs/p/teacher"
    assert stage["overrides"] == ["data.n_folds=5", "data.fold=3", "data.split_seed=7", "model.anchor_blend=1.0",
                                  "model.anchor_fallback=false"]
    (pool,) = OmegaConf.to_container(cfg.data.sources, resolve=True)
    assert pool["path"].endswith("autoj_pairwise_test.csv") and pool["teacher"] == "/runs/p/teacher"
    assert (pool["weight"], pool["loss_weight"]) == (0.5, 0.5)
    for key in ("model", "trainer"):  # everything else is arena_small's
        assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(small[key])


@pytest.mark.parametrize("model", ["tiny", "deberta_v3_small", "minilm", "llm_lora"])
def test_model_files_inherit_the_shared_keys_of_one_base_file(model):
    """conf/model/_base.yaml holds the keys every model shares; each model file states only its own."""
    import yaml

    base = yaml.safe_load((Path(CONF) / "model" / "_base.yaml").read_text())
    cfg = compose_train([f"model={model}"])
    assert set(base) <= set(cfg.model)
    for name in ("tiny", "deberta_v3_small"):
        own = yaml.safe_load((Path(CONF) / "model" / f"{name}.yaml").read_text())
        assert own["defaults"] == ["_base"] and not set(own) & (set(base) - {"tiny_config", "tokenizer_vocab_size"})


def test_the_model_config_instantiates_with_the_data_facts(tiny_tokenizer, synthetic_csv):
    """Every key of conf/model/*.yaml is a constructor argument: `instantiate(cfg.model, spec=..., ...)`
    builds the module (tokenizer and anchor-fit keys are recorded, not used), and a model-key override
    reaches it."""
    from pref_lightning.model.module import PreferenceModule

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=4)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    cfg = compose_train(["model.tiny_config.hidden_size=32", "model.tiny_config.num_hidden_layers=1",
                         "model.tiny_config.num_attention_heads=2", "model.tiny_config.intermediate_size=64",
                         "model.head_hidden=8", "model.lr=0.5", "model.anchor_l2=2.0"])
    model = instantiate(cfg.model, _convert_="all", vocab_size=len(tiny_tokenizer), spec=dm.spec,
                        train_prior=dm.train_prior.tolist(), reference={"prior_log_loss": 1.0})
    assert isinstance(model, PreferenceModule) and model.spec == dm.spec
    assert model.hparams.lr == 0.5 and model.hparams.anchor_l2 == 2.0 and model.hparams.tokenizer_vocab_size == 8000
    batch = next(iter(dm.val_dataloader()))
    assert model(batch).shape == (len(batch["labels"]), 3)
