"""benchmarks/synthetic_gap.py: the diagnosis of where a trained run's gap to the oracle goes."""

from __future__ import annotations

import lightning as L
import pytest

from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.tokenizers import tokenizer_files
from pref_lightning.model.module import PreferenceModule

from .conftest import TEST_TINY, load_benchmark


@pytest.mark.slow
def test_the_diagnosis_splits_the_expected_gap_over_row_groups(tmp_path, tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=48, batch_size=16)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                              spec=dm.spec, interaction="prompt_answer_embeddings",
                              tokenizer_files=tokenizer_files(tiny_tokenizer, tmp_path / "tok"))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    found = load_benchmark("synthetic_gap").diagnose(path, rows=160)
    groups = found["groups"]
    off, on = groups["an answer off the prompt's topic"], groups["both answers on topic"]
    assert off["rows"] + on["rows"] == 160 and off["rows"] > 0
    # the two complementary groups hold the whole expected gap, as their row-weighted mean
    assert off["share_of_gap"] + on["share_of_gap"] == pytest.approx(1.0, abs=2e-3)
    mean = (off["rows"] * off["expected_gap"] + on["rows"] * on["expected_gap"]) / 160
    assert mean == pytest.approx(found["expected_gap"], abs=1e-3)
    # three steps from scratch are far from the oracle: a KL, never negative, and well above zero
    assert found["expected_gap"] > 0.05 and all(g["expected_gap"] >= 0 for g in groups.values())
    assert 0.0 <= found["topic_match_auc"] <= 1.0
