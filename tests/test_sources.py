"""Mixing extra sources into the training split: dedup against the whole training file, weights, counts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.folds import prompt_key
from pref_lightning.data.records import DataError, PairRecord
from pref_lightning.data.sources import mix_sources, parse_sources, resample

from .conftest import ARENA_SAMPLE, SHARED_DATA, TEST_TINY, needs_shared_data


def kaggle_frame(n, prefix="t", start=0):
    rows = []
    for i in range(start, start + n):
        label = i % 3
        rows.append({"id": f"{prefix}{i}", "model_a": "x", "model_b": "y", "prompt": json.dumps([f"Question {i}?"]),
                     "response_a": json.dumps([f"answer a {i}"]), "response_b": json.dumps([f"answer b {i}"]),
                     "winner_model_a": int(label == 0), "winner_model_b": int(label == 1),
                     "winner_tie": int(label == 2)})
    return pd.DataFrame(rows)


@pytest.fixture
def mix_files(tmp_path):
    train = kaggle_frame(60)
    train.to_csv(tmp_path / "train.csv", index=False)
    # extra: 10 new rows, 5 rows re-using training prompts (differently cased / spaced), 1 exact duplicate
    extra = kaggle_frame(10, prefix="e", start=100)
    reused = kaggle_frame(5, prefix="r", start=0)
    reused["prompt"] = [json.dumps([f"  QUESTION   {i}? "]) for i in range(5)]
    dup = extra.iloc[[3]].assign(id="e-dup")
    pd.concat([extra, reused, dup]).to_csv(tmp_path / "extra.csv", index=False)
    pairs = pd.DataFrame({"id": [f"c{i}" for i in range(8)], "prompt": [f"chosen prompt {i}" for i in range(8)],
                          "chosen": ["good"] * 8, "rejected": ["bad"] * 8})
    pairs.loc[0, "prompt"] = "Question 7?"  # a training prompt: removed
    pairs.to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    return tmp_path


def test_extra_sources_enter_training_only_and_are_counted(mix_files, caplog):
    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3,
                              sources=[str(mix_files / "extra.csv"),
                                       {"path": str(mix_files / "pairs.jsonl"), "weight": 2}])
    with caplog.at_level(logging.INFO, logger="pref_lightning.data.sources"):
        dm.load_records()
    counts = dm.data_counts
    assert counts["train_file"]["rows_read"] == 60 and counts["train_file"]["val_rows"] == len(dm.val_records)
    extra, pairs = counts["sources"]
    assert (extra["rows_read"], extra["removed_prompt_in_train_file"], extra["removed_exact_duplicates"],
            extra["kept"], extra["added_to_train"]) == (16, 5, 1, 10, 10)
    assert (pairs["format"], pairs["rows_read"], pairs["removed_prompt_in_train_file"], pairs["kept"],
            pairs["added_to_train"]) == ("chosen_rejected", 8, 1, 7, 14)
    assert counts["totals"]["removed_prompt_in_train_file"] == 6
    assert counts["train_rows"] == len(dm.train_records) == counts["train_file"]["train_rows"] + 24
    # validation is the training file's held-out rows only; no extra row shares a validation prompt
    assert all(r.id.startswith("t") for r in dm.val_records)
    val_prompts = {prompt_key(r) for r in dm.val_records}
    assert not any(prompt_key(r) in val_prompts for r in dm.train_records)
    assert "removed 5 whose prompt is in the training file and 1 exact duplicates" in caplog.text


def test_mix_with_the_same_split_as_without(mix_files):
    plain = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3)
    mixed = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3,
                                 sources=[str(mix_files / "extra.csv")])
    plain.load_records()
    mixed.load_records()
    assert [r.id for r in plain.val_records] == [r.id for r in mixed.val_records]
    assert [r.id for r in plain.train_records] == [r.id for r in mixed.train_records][: len(plain.train_records)]


def test_weights_resample_seeded():
    records = [PairRecord(str(i), [str(i)], ["a"], ["b"], 0) for i in range(10)]
    assert len(resample(records, 0.5, 1)) == 5 and len(resample(records, 2, 1)) == 20
    assert len(resample(records, 1.5, 1)) == 15 and resample(records, 0, 1) == []
    assert [r.id for r in resample(records, 0.5, 1)] == [r.id for r in resample(records, 0.5, 1)]


def test_parse_sources_rejects_bad_entries():
    assert parse_sources(None) == []
    with pytest.raises(ValueError, match="needs path"):
        parse_sources([{"weight": 1}])
    with pytest.raises(ValueError, match="weight"):
        parse_sources([{"path": "x", "weight": -1}])


def test_id_collisions_get_a_suffix_and_bad_rows_follow_the_policy(tmp_path):
    train = [PairRecord("1", ["p"], ["a"], ["b"], 0)]
    frame = kaggle_frame(3, prefix="", start=0)
    frame["prompt"] = [json.dumps([f"other {i}"]) for i in range(3)]
    frame["winner_tie"] = frame["winner_tie"].astype(str)
    frame.loc[2, "winner_tie"] = "maybe"
    frame.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(DataError, match=r"extra.csv: row id=2: column winner_tie has 'maybe'"):
        mix_sources(train, parse_sources([str(tmp_path / "extra.csv")]), prompt_key=prompt_key)
    extra, counts = mix_sources(train, parse_sources([str(tmp_path / "extra.csv")]), prompt_key=prompt_key,
                                on_bad_rows="skip")
    assert [r.id for r in extra] == ["0", "1@extra"] and counts[0]["skipped_bad_rows"] == 1
    assert counts[0]["ids_suffixed"] == 1


def test_binary_datamodule_skips_ties_and_has_two_class_prior(mix_files, caplog):
    with pytest.raises(DataError, match=r"train.csv: row id=t2: column winner_tie is a tie"):
        PreferenceDataModule(train_path=str(mix_files / "train.csv"), n_classes=2).load_records()
    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), n_classes=2, on_bad_rows="skip",
                              val_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.load_records()
    assert dm.data_counts["train_file"]["skipped_bad_rows"] == 20
    assert "skipped 20 of 60 rows" in caplog.text and "id=t59 column=winner_tie" in caplog.text
    assert dm.train_prior.shape == (2,) and set(dm.train_labels.tolist()) <= {0, 1}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_binary_module_two_logits_and_swap(tiny_tokenizer, mix_files):
    from pref_lightning.model.module import PreferenceModule

    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), n_classes=2, on_bad_rows="skip",
                              max_length=32, batch_size=6, val_fraction=0.2)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer),
                              head_hidden=16, spec=dm.spec)
    batch = next(iter(dm.train_dataloader()))
    logits = module(batch, tta_swap=True)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert module.n_classes == 2
    with pytest.raises(ValueError, match="n_classes"):
        PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), spec={"n_classes": 4})


@needs_shared_data()
def test_shared_real_files_mix_counts():
    files = ["hh_rlhf_test.csv", "autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "hhh_alignment.csv"]
    dm = PreferenceDataModule(train_path=str(ARENA_SAMPLE), val_fraction=0.05,
                              sources=[{"path": str(SHARED_DATA / f), "weight": 1.0} for f in files])
    dm.load_records()
    counts = dm.data_counts
    assert counts["train_file"]["rows_read"] == 999
    assert [c["rows_read"] for c in counts["sources"]] == [8514, 1392, 999, 221]
    totals = counts["totals"]
    assert totals["kept"] == totals["rows_read"] - totals["removed_prompt_in_train_file"] \
        - totals["removed_exact_duplicates"] - totals["skipped_bad_rows"]
    assert counts["train_rows"] == counts["train_file"]["train_rows"] + totals["added_to_train"]
    val_prompts = {prompt_key(r) for r in dm.val_records}
    assert not any(prompt_key(r) in val_prompts for r in dm.train_records)
    assert np.isclose(dm.train_prior.sum(), 1.0)


def test_non_kaggle_training_file_with_the_cache_configured(tmp_path):
    """The cache serves Kaggle files only; other formats are detected from the header and read by adapters."""
    from .test_adapters import ARENA, arena_row, write_jsonl

    rows = ARENA + [arena_row(f"x{i}", "model_b", user=(f"question {i}",)) for i in range(20)]
    write_jsonl(tmp_path / "arena.jsonl", rows)
    dm = PreferenceDataModule(train_path=str(tmp_path / "arena.jsonl"), cache_dir=str(tmp_path / "cache"),
                              val_fraction=0.2)
    dm.load_records()
    assert dm.data_counts["train_file"]["format"] == "arena_conversations"
    assert len(dm.train_records) + len(dm.val_records) == 24
    from .test_adapters import wsdm_frame

    wsdm_frame().to_parquet(tmp_path / "w.parquet")
    dm = PreferenceDataModule(train_path=str(tmp_path / "w.parquet"), cache_dir=str(tmp_path / "cache"),
                              val_fraction=0.4)
    dm.load_records()
    assert dm.data_counts["train_file"]["format"] == "wsdm"


def test_mix_and_wsdm_configs_compose():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        mix = compose(config_name="train", overrides=["data=mix", "data.sources.0.weight=0.25"])
        wsdm = compose(config_name="train", overrides=["data=wsdm", "data.train_path=t.parquet"])
        kaggle = compose(config_name="train", overrides=["data=kaggle", "data.train_path=t.csv"])
    dm = instantiate(mix.data)
    assert dm.train_path.endswith("lmsys_arena_sample.csv") and len(dm.sources) == 4
    assert dm.sources[0].weight == 0.25 and dm.sources[0].path.endswith("hh_rlhf_test.csv")
    assert (wsdm.data.n_classes, wsdm.data.train_format, wsdm.data.on_bad_rows) == (2, "wsdm", "raise")
    assert (kaggle.data.n_classes, list(kaggle.data.sources), kaggle.data.on_bad_rows) == (3, [], "raise")


def test_anchor_fits_on_the_training_file_rows_unless_told_all(mix_files, tiny_tokenizer):
    from pref_lightning.core.errors import UserError
    from pref_lightning.model.anchor import anchor_logits, fit_anchor_on

    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3, max_length=32,
                              sources=[str(mix_files / "extra.csv"), str(mix_files / "pairs.jsonl")])
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    n_file = dm.data_counts["train_file"]["train_rows"]
    assert len(dm.train_set) > n_file
    sa, sb, labels = dm.split_statistics("train")
    own = fit_anchor_on(dm, l2=0.1)
    assert own["rows"] == "train_file"
    from pref_lightning.model.anchor import fit_anchor

    expected = fit_anchor(sa[:n_file], sb[:n_file], labels[:n_file], l2=0.1)
    np.testing.assert_allclose(anchor_logits(own, sa, sb), anchor_logits(expected, sa, sb), atol=1e-9)
    every = fit_anchor_on(dm, l2=0.1, rows="all")
    assert every["rows"] == "all" and not np.allclose(anchor_logits(every, sa, sb), anchor_logits(own, sa, sb))
    chosen = fit_anchor_on(dm)  # the penalty by CV, recorded with each candidate's CV log loss
    assert chosen["l2"] in (0.01, 0.03, 0.1, 0.3, 1.0)
    with pytest.raises(UserError, match="model.anchor_rows"):
        fit_anchor_on(dm, rows="extra")


def test_an_unlabelled_pool_trains_on_its_teachers_confident_rows(mix_files, tiny_tokenizer):
    """A pseudo-labelled source (data.sources[].teacher): unlabelled rows, targets = the teacher's
    probabilities by id, rows with |P(A) - P(B)| <= min_margin dropped, labels = the teacher's argmax."""
    pool = kaggle_frame(6, prefix="u", start=200).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    pool.to_csv(mix_files / "pool.csv", index=False)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.45, 0.44, 0.11], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2],
                      [0.05, 0.9, 0.05]])
    teacher = pd.DataFrame({"id": pool["id"], "winner_model_a": probs[:, 0], "winner_model_b": probs[:, 1],
                            "winner_tie": probs[:, 2]})
    teacher.to_csv(mix_files / "pool_teacher.csv", index=False)
    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3,
                              sources=[{"path": str(mix_files / "pool.csv"), "teacher": str(mix_files / "pool_teacher.csv"),
                                        "min_margin": 0.05}])
    dm.load_records()
    (count,) = dm.data_counts["sources"]
    # u202 (|0.45 - 0.44| = 0.01) and u203 (|0.2 - 0.2| = 0) are below the margin
    assert count["removed_low_margin"] == 2 and count["added_to_train"] == 4 and count["ties"] is True
    pseudo = {r.id: (r.label, t) for r, t in zip(dm.train_records, dm.data.pseudo_targets) if t is not None}
    assert sorted(pseudo) == ["u200", "u201", "u204", "u205"]
    assert [pseudo[i][0] for i in sorted(pseudo)] == [0, 1, 0, 1]
    np.testing.assert_allclose(pseudo["u201"][1], probs[1], rtol=1e-6)
    assert all(t is None for r, t in zip(dm.train_records, dm.data.pseudo_targets) if not r.id.startswith("u"))
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")  # the encoded training pairs carry the teacher's probabilities as their targets
    targets = {i: p.target for i, p in zip(dm.train_ids, dm.train_set.pairs)}
    np.testing.assert_allclose(targets["u205"], probs[5], rtol=1e-6)
    np.testing.assert_array_equal(targets[dm.train_ids[0]], np.eye(3)[dm.train_set.pairs[0].label])
    batch = dm.collator()(dm.train_set.pairs)  # labelled and pseudo-labelled rows batch together
    assert batch["targets"].shape == (len(dm.train_set), 3)
    # min_margin 0 (the default) keeps every row, u203's exactly balanced one too
    every = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2, split_seed=3,
                                 sources=[{"path": str(mix_files / "pool.csv"), "teacher": str(mix_files / "pool_teacher.csv")}])
    every.load_records()
    assert every.data_counts["sources"][0]["removed_low_margin"] == 0
    assert every.data_counts["sources"][0]["added_to_train"] == 6


def test_a_pseudo_labelled_row_missing_from_its_teacher_is_named(mix_files):
    pool = kaggle_frame(3, prefix="u", start=200).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    pool.to_csv(mix_files / "pool.csv", index=False)
    pd.DataFrame({"id": ["u200"], "winner_model_a": [0.5], "winner_model_b": [0.3], "winner_tie": [0.2]}).to_csv(
        mix_files / "t.csv", index=False)
    dm = PreferenceDataModule(train_path=str(mix_files / "train.csv"), val_fraction=0.2,
                              sources=[{"path": str(mix_files / "pool.csv"), "teacher": str(mix_files / "t.csv")}])
    with pytest.raises(DataError, match=r"t\.csv: 2 of 3 .*u201"):
        dm.load_records()
    with pytest.raises(ValueError, match="min_margin needs a teacher"):
        parse_sources([{"path": "x.csv", "min_margin": 0.1}])
