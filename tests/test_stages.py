"""Stages (issue 21): init_from across backbones and class counts, the frozen text anchor, stage training."""

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pref_lightning.core.errors import UserError
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.tokenizers import tokenizer_files
from pref_lightning.model.anchor import anchor_log_loss, fit_anchor_on
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, payload
from pref_lightning.model.module import PreferenceModule
from pref_lightning.model.stages import (
    apply_init,
    read_init,
    read_text_scorer,
    score_columns,
    text_side_columns,
)
from pref_lightning.train.stages import ensure_stage

from .conftest import REPO, SHARED_DATA, TEST_TINY, needs_shared_data


def tiny(tokenizer, seed: int, n_classes: int = 3, tiny_config=TEST_TINY, **kwargs) -> PreferenceModule:
    torch.manual_seed(seed)
    return PreferenceModule(backbone="tiny", tiny_config=tiny_config, vocab_size=len(tokenizer), head_hidden=16,
                            spec={"n_classes": n_classes, "max_length": 32}, **kwargs)


def write_checkpoint(model: PreferenceModule, tokenizer, path) -> str:
    """A pref-lightning checkpoint of `model` as training writes it (weights, hparams, payload)."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                CHECKPOINT_KEY: payload(model.backbone.config.to_dict(), tokenizer_files(tokenizer), 1.0)}, path)
    return str(path)


def backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def test_init_from_loads_the_backbone_and_a_head_of_the_same_shape(tiny_tokenizer, tmp_path):
    stage1 = tiny(tiny_tokenizer, seed=1, use_text_stats=False)
    path = write_checkpoint(stage1, tiny_tokenizer, tmp_path / "stage1.ckpt")
    stage2 = tiny(tiny_tokenizer, seed=2, use_text_stats=False)
    assert not torch.equal(stage2.head.mlp[0].weight, stage1.head.mlp[0].weight)
    init = read_init(path)
    info = apply_init(stage2, init)
    assert info["head"] == "loaded" and info["backbone_tensors"] == len(backbone_state(stage1))
    for name, tensor in stage1.state_dict().items():
        if name.startswith(("backbone.", "head.")):
            assert torch.equal(stage2.state_dict()[name], tensor), name
    (entry,) = init["lineage"]
    assert entry["role"] == "init_from" and entry["path"].endswith("stage1.ckpt") and len(entry["fingerprint"]) == 16


def test_a_binary_stage_starts_a_three_way_model_with_a_fresh_head(tiny_tokenizer, tmp_path):
    binary = tiny(tiny_tokenizer, seed=1, n_classes=2, use_text_stats=False)
    path = write_checkpoint(binary, tiny_tokenizer, tmp_path / "binary.ckpt")
    three = tiny(tiny_tokenizer, seed=2, n_classes=3)
    head_before = {k: v.clone() for k, v in three.state_dict().items() if k.startswith("head.")}
    info = apply_init(three, read_init(path))
    assert info["head"] == "fresh" and "2 classes" in info["why"]
    for name, tensor in backbone_state(binary).items():
        assert torch.equal(three.state_dict()[name], tensor)
    for name, tensor in head_before.items():  # the 3-way head is untouched
        assert torch.equal(three.state_dict()[name], tensor)


def test_lineage_chains_through_stages(tiny_tokenizer, tmp_path):
    first = write_checkpoint(tiny(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "a.ckpt")
    second_model = tiny(tiny_tokenizer, seed=2, lineage=read_init(first)["lineage"])
    second = write_checkpoint(second_model, tiny_tokenizer, tmp_path / "b.ckpt")
    lineage = read_init(second)["lineage"]
    assert [e["path"].rsplit("/", 1)[-1] for e in lineage] == ["a.ckpt", "b.ckpt"]


def test_init_from_another_backbone_is_refused_naming_the_file(tiny_tokenizer, tmp_path):
    wider = {**TEST_TINY, "hidden_size": TEST_TINY["hidden_size"] * 2,
             "intermediate_size": TEST_TINY["intermediate_size"] * 2}
    path = write_checkpoint(tiny(tiny_tokenizer, seed=1, tiny_config=wider), tiny_tokenizer, tmp_path / "wide.ckpt")
    with pytest.raises(UserError, match="wide.ckpt.*not this model's backbone"):
        apply_init(tiny(tiny_tokenizer, seed=2), read_init(path))


def test_text_side_columns_are_shift_invariant_and_swap_with_the_sides():
    logits = torch.tensor([[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]])
    a, b = text_side_columns(logits)
    a2, b2 = text_side_columns(logits + 7.0)
    assert torch.allclose(a, a2) and torch.allclose(b, b2)
    sa, sb = text_side_columns(logits[:, [1, 0, 2]])
    assert torch.allclose(sa, b) and torch.allclose(sb, a)
    ba, bb = text_side_columns(torch.tensor([[2.0, 1.0]]))
    assert ba.item() == pytest.approx(0.5) and bb.item() == pytest.approx(-0.5)


def test_a_text_anchor_must_read_the_text_alone(tiny_tokenizer, tmp_path):
    path = write_checkpoint(tiny(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "stats.ckpt")
    with pytest.raises(UserError, match="stats.ckpt.*use_text_stats"):
        read_text_scorer(path, "siamese")
    text_only = write_checkpoint(tiny(tiny_tokenizer, seed=1, use_text_stats=False), tiny_tokenizer, tmp_path / "t.ckpt")
    with pytest.raises(UserError, match="siamese"):
        read_text_scorer(text_only, "cross")


@pytest.fixture(scope="module")
def datamodule(tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=16, eval_batch_size=64)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    return dm


def test_the_text_anchor_is_step_zero_and_travels_in_the_checkpoint(tiny_tokenizer, datamodule, tmp_path):
    """Step 0 of a model with a text anchor scores the regression on statistics + the frozen stage's text score
    exactly; the checkpoint alone (stage-1 file deleted) reproduces it."""
    dm = datamodule
    stage1 = tiny(tiny_tokenizer, seed=5, use_text_stats=False)
    with torch.no_grad():  # a stage whose scores vary from pair to pair
        stage1.head.mlp[-1].weight.normal_(0, 2.0)
    path = tmp_path / "stage1.ckpt"
    write_checkpoint(stage1, tiny_tokenizer, path)
    settings, weights, _ = read_text_scorer(path, "siamese")
    scorer = PreferenceModule(**settings["hparams"], backbone_config=settings["backbone_config"])
    scorer.load_state_dict(weights)
    scorer.eval()

    def columns(pairs):
        return score_columns(lambda b: scorer(b, tta_swap=True), pairs, dm.collator(), 64)

    anchor = fit_anchor_on(dm, side_columns=columns)
    n_stats = dm.spec.n_stats
    assert np.asarray(anchor["weight"]).shape[0] == 4 * (n_stats + 1)
    text_a, text_b = columns(dm.val_set.pairs)
    assert text_a.std() > 1e-3  # the frozen stage's score varies with the text
    val_a, val_b, labels = dm.split_statistics("val")
    baseline = anchor_log_loss(anchor, np.concatenate([val_a, text_a], 1), np.concatenate([val_b, text_b], 1),
                               labels, True, 0.002)
    stats_only = anchor_log_loss(fit_anchor_on(dm), val_a, val_b, labels, True, 0.002)
    assert abs(baseline - stats_only) > 1e-4  # the text score changed the regression's predictions
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                             spec=dm.spec, anchor_head=True, anchor=anchor, text_anchor=settings,
                             tokenizer_files=tokenizer_files(tiny_tokenizer))
    model.text_scorer.load_state_dict(scorer.state_dict())
    assert not any(p.requires_grad for p in model.text_scorer.parameters())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False, max_steps=0)
    trainer.fit(model, dm)
    assert not model.text_scorer.training  # frozen stage stays in eval mode whatever the loop sets
    step0 = trainer.validate(model, dm, verbose=False)[0]["val/log_loss"]
    assert step0 == pytest.approx(baseline, abs=1e-4)
    saved = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(saved)
    path.unlink()  # prediction needs the stage-2 file alone
    restored, _, _ = PreferenceModule.from_checkpoint(str(saved))
    again = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False)
    assert again.validate(restored, dm, verbose=False)[0]["val/log_loss"] == pytest.approx(baseline, abs=1e-4)


def test_training_leaves_the_text_scorer_frozen(tiny_tokenizer, datamodule, tmp_path):
    dm = datamodule
    stage1 = tiny(tiny_tokenizer, seed=5, use_text_stats=False)
    path = write_checkpoint(stage1, tiny_tokenizer, tmp_path / "s1.ckpt")
    settings, weights, _ = read_text_scorer(path, "siamese")
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                             spec=dm.spec, text_anchor=settings, lr=1e-3, head_lr=1e-3)
    model.text_scorer.load_state_dict(weights)
    before = {k: v.clone() for k, v in model.text_scorer.state_dict().items()}
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu", enable_model_summary=False)
    trainer.fit(model, dm)
    assert all(torch.equal(model.text_scorer.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(model.head.mlp[0].weight, tiny(tiny_tokenizer, seed=0).head.mlp[0].weight)


def test_a_missing_stage_is_trained_once_then_reused(tmp_path, monkeypatch):
    import subprocess

    calls = []

    def fake_run(command, **_):
        calls.append(command)
        (tmp_path / "s1" / "checkpoints").mkdir(parents=True)
        (tmp_path / "s1" / "checkpoints" / "best.ckpt").write_bytes(b"x")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr("pref_lightning.train.stages.subprocess.run", fake_run)
    stage = {"experiment": "pairs_stage1", "dir": str(tmp_path / "s1"), "overrides": ["trainer.max_epochs=2"]}
    assert ensure_stage(stage, "/data", 7) == tmp_path / "s1" / "checkpoints" / "best.ckpt"
    assert ensure_stage(stage, "/data", 7) == tmp_path / "s1" / "checkpoints" / "best.ckpt"
    (command,) = calls
    assert "experiment=pairs_stage1" in command and f"hydra.run.dir={tmp_path / 's1'}" in command
    assert "paths.data_dir=/data" in command and "seed=7" in command and "trainer.max_epochs=2" in command
    assert ensure_stage(None, "/data", 7) is None

    monkeypatch.setattr("pref_lightning.train.stages.subprocess.run",
                        lambda command, **_: subprocess.CompletedProcess(command, 1))
    with pytest.raises(UserError, match="stage pairs_stage1 failed.*experiment=pairs_stage1"):
        ensure_stage({**stage, "dir": str(tmp_path / "s2")}, "/data", 7)


def test_vocabularies_compare_by_ids_not_file_bytes(tiny_tokenizer, llm_dirs):
    from pref_lightning.model.backbone import load_tokenizer
    from pref_lightning.model.stages import same_vocabulary

    files = tokenizer_files(tiny_tokenizer)
    files["tokenizer.json"] = files["tokenizer.json"].replace(b'"truncation":null', b'"truncation": null')
    assert same_vocabulary(files, tiny_tokenizer)
    assert not same_vocabulary(files, load_tokenizer(str(llm_dirs["llama"])))


def test_a_checkpoint_teacher_becomes_the_file_of_its_uncalibrated_predictions(tiny_tokenizer, synthetic_csv,
                                                                               tmp_path):
    """data.sources[i].teacher naming a checkpoint (or a run folder): train.py first writes RUN/teachers/<i>_<stem>.csv,
    predict.py's output on the source with calibrate=false, one row per source id, the same whatever temperature
    the teacher stored (it was fitted on the teacher's validation rows: a fold run's scored rows); reused while
    newer than the checkpoint; a teacher file passes through; a missing checkpoint is a one-line error."""
    import pandas as pd

    from pref_lightning.train.stages import teacher_files

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")  # the spec with its fitted statistics' normalisation, which prediction reads
    torch.manual_seed(3)
    teacher = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                               spec=dm.spec, use_text_stats=False)
    with torch.no_grad():  # a teacher whose probabilities vary from row to row
        teacher.head.mlp[-1].weight.normal_(0, 2.0)
    run = tmp_path / "teacher_run"
    (run / "checkpoints").mkdir(parents=True)
    plain = write_checkpoint(teacher, tiny_tokenizer, run / "checkpoints" / "best.ckpt")
    hot = tmp_path / "hot.ckpt"
    checkpoint = torch.load(plain, weights_only=True)
    checkpoint[CHECKPOINT_KEY]["temperature"] = 3.0
    torch.save(checkpoint, hot)
    sources = [{"path": str(synthetic_csv), "teacher": str(run), "weight": 0.5}, {"path": "other.csv"},
               {"path": "pool.csv", "teacher": "pool_teacher.csv"}]
    resolved = teacher_files(sources, tmp_path / "student")
    written = tmp_path / "student" / "teachers" / f"0_{synthetic_csv.stem}.csv"
    assert resolved == [{**sources[0], "teacher": str(written)}, sources[1], sources[2]]
    probs = pd.read_csv(written)
    ids = pd.read_csv(synthetic_csv)["id"]
    assert probs["id"].tolist() == ids.tolist()
    values = probs[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert np.allclose(values.sum(1), 1.0, atol=1e-6) and values.std(0).max() > 0.01
    stamp = written.stat().st_mtime_ns
    assert teacher_files(sources, tmp_path / "student") == resolved and written.stat().st_mtime_ns == stamp
    pool_copy = tmp_path / "pool_copy.csv"  # a pool file newer than its teacher file: predicted again
    pool_copy.write_bytes(synthetic_csv.read_bytes())
    (again,) = teacher_files([{"path": str(pool_copy), "teacher": str(run)}], tmp_path / "student")
    assert again["teacher"] == str(tmp_path / "student" / "teachers" / "0_pool_copy.csv")
    os.utime(again["teacher"], ns=(1, 1))
    teacher_files([{"path": str(pool_copy), "teacher": str(run)}], tmp_path / "student")
    assert Path(again["teacher"]).stat().st_mtime_ns > 1
    (hot_run,) = teacher_files([{"path": str(synthetic_csv), "teacher": str(hot)}], tmp_path / "hot")
    hot_values = pd.read_csv(hot_run["teacher"])[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert np.allclose(hot_values, values, atol=1e-6)  # uncalibrated: the stored temperature is not applied
    with pytest.raises(UserError, match=r"data.sources\[0\].teacher=.*missing.ckpt"):
        teacher_files([{"path": str(synthetic_csv), "teacher": str(tmp_path / "missing.ckpt")}], tmp_path / "x")


@pytest.mark.slow
@needs_shared_data()
def test_arena_pseudo_trains_its_teacher_labels_the_pool_and_trains_the_student(tmp_path):
    """experiment=arena_pseudo end to end on a tiny backbone (a few batches): one command trains the teacher stage
    into RUN/teacher on the same fold, writes its uncalibrated predictions of the Auto-J pool to RUN/teachers/,
    and trains the student on the arena rows plus that pool, which metrics.json counts."""
    import json
    import subprocess
    import sys

    import pandas as pd

    tiny_run = ["model=tiny", "trainer.limit_train_batches=2", "trainer.max_epochs=1", "data.max_length=32",
                "report=false"]
    stage = ["data.n_folds=5", "data.fold=1", "data.split_seed=42", "model.anchor_blend=1.0",
             "model.anchor_fallback=false", *tiny_run]
    run = tmp_path / "pseudo"
    command = [sys.executable, "train.py", "experiment=arena_pseudo", f"paths.data_dir={SHARED_DATA}",
               f"hydra.run.dir={run}", "data.fold=1", *tiny_run,
               "stage1.overrides=[" + ",".join(f"'{o}'" for o in stage) + "]"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = json.loads((run / "teacher" / "metrics.json").read_text())
    student = json.loads((run / "metrics.json").read_text())
    assert teacher["fold"] == student["fold"] == 1 and teacher["train_rows"] == 799
    pool = pd.read_csv(run / "teachers" / "0_autoj_pairwise_test.csv")
    assert len(pool) == len(pd.read_csv(SHARED_DATA / "autoj_pairwise_test.csv"))
    (source,) = student["data_counts"]["sources"]
    assert source["teacher"] == str(run / "teachers" / "0_autoj_pairwise_test.csv") and source["removed_low_margin"] == 0
    assert student["train_rows"] == 799 + source["added_to_train"] and source["added_to_train"] > 600
