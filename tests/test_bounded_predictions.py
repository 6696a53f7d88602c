"""No catastrophic prediction: a model trained on real arena rows, shown rows far outside anything it was
trained on (statistics at 10x and 100x the training maximum, every flag set, null / empty answers), keeps
every class probability >= 1e-3 (issue 10)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from pref_lightning.data.collate import PairCollator
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.pairs import STATS_FEATURES, EncodedPair, PairEncoder
from pref_lightning.data.stats_norm import apply_stats_norm
from pref_lightning.model.module import PreferenceModule

from .conftest import ARENA_SAMPLE, TEST_TINY, needs_shared_data

pytestmark = needs_shared_data()
MAX_LENGTH = 64
FLOOR_TARGET = 1e-3
ODD_ROWS = '''id,prompt,response_a,response_b
101,"[""Say hi""]","[null]","[null]"
102,"[""Name a colour""]","[]","[]"
103,"[""Count to three""]","[""""]","[""""]"
104,"[""Why?""]","[null, null]","[""""]"
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 epochs on the real arena sample (~15 s on 2 cores)."""
    from pref_lightning.data.tokenizers import cached_trained_tokenizer

    L.seed_everything(0)
    dm = PreferenceDataModule(train_path=str(ARENA_SAMPLE), max_length=MAX_LENGTH, batch_size=32, val_fraction=0.2,
                              num_workers=0)
    dm.load_records()
    tokenizer = cached_trained_tokenizer(dm.tokenizer_texts(), 600, tmp_path_factory.mktemp("tok"))
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=32,
                             lr=2e-3, head_lr=2e-3, spec=dm.spec)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        accelerator="cpu", num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, dm)
    model.eval()
    return model, tokenizer, dm


def probabilities(model: PreferenceModule, pairs: list[EncodedPair]) -> torch.Tensor:
    batch = PairCollator(pad_id=0)(pairs)
    with torch.no_grad():
        return model.probabilities(model(batch, tta_swap=True), calibrated=True)


def raw_pairs(dm: PreferenceDataModule, tokenizer, records) -> list[EncodedPair]:
    return PairEncoder(tokenizer, EncodingSpec(max_length=MAX_LENGTH)).encode(records)


def normalised(pairs: list[EncodedPair], norm) -> list[EncodedPair]:
    return [EncodedPair(p.ids_a, p.ids_b, p.label, p.index, apply_stats_norm(p.stats_a, norm),
                        apply_stats_norm(p.stats_b, norm)) for p in pairs]


def extreme_pairs(trained, factor: float) -> list[EncodedPair]:
    """Real validation rows with one statistic at `factor` x its training maximum (on side A, on side B, on
    both), for every statistic, plus rows with every flag set."""
    model, tokenizer, dm = trained
    train = raw_pairs(dm, tokenizer, dm.train_records)
    top = np.stack([p.stats_a for p in train] + [p.stats_b for p in train]).max(0)
    base = raw_pairs(dm, tokenizer, dm.val_records[:4])
    out = []
    for j, _ in enumerate(STATS_FEATURES):
        for sides in ("a", "b", "ab"):
            for pair in base:
                a, b = pair.stats_a.copy(), pair.stats_b.copy()
                value = factor * max(float(top[j]), 1.0)
                if "a" in sides:
                    a[j] = value
                if "b" in sides:
                    b[j] = value
                out.append(EncodedPair(pair.ids_a, pair.ids_b, pair.label, len(out), a, b))
    flags = [STATS_FEATURES.index(name) for name in ("empty", "null_turn")]
    for pair in base:
        a, b = pair.stats_a.copy(), pair.stats_b.copy()
        a[flags] = 1.0
        out.append(EncodedPair(pair.ids_a, pair.ids_b, pair.label, len(out), a, b.copy()))
        b[flags] = 1.0
        out.append(EncodedPair(pair.ids_a, pair.ids_b, pair.label, len(out), a, b))
    return normalised(out, dm.spec.stats_norm)


@pytest.mark.parametrize("factor", [10.0, 100.0])
def test_statistics_far_outside_training_keep_every_class_above_the_floor(trained, factor):
    probs = probabilities(trained[0], extreme_pairs(trained, factor))
    assert probs.min() >= FLOOR_TARGET


@pytest.mark.parametrize("factor", [10.0, 100.0])
def test_bounded_statistics_alone_keep_out_of_range_rows_as_confident_as_training_rows(trained, factor):
    """The kind, without the output guard: out-of-range inputs give logits no more extreme than the
    model's own on real validation rows allow (the floor is switched off here)."""
    model, tokenizer, dm = trained
    floor = model.evaluation.prob_floor
    model.set_evaluation(prob_floor=0.0)
    try:
        val = probabilities(model, normalised(raw_pairs(dm, tokenizer, dm.val_records), dm.spec.stats_norm))
        odd = probabilities(model, extreme_pairs(trained, factor))
    finally:
        model.set_evaluation(prob_floor=floor)
    assert odd.min() >= min(FLOOR_TARGET, float(val.min()) / 10)


def test_null_and_empty_answers_keep_every_class_above_the_floor(trained, tmp_path):
    model, tokenizer, dm = trained
    path = tmp_path / "odd.csv"
    path.write_text(ODD_ROWS)
    odd = PreferenceDataModule(predict_path=str(path), max_length=MAX_LENGTH, stats_norm=dm.spec.stats_norm,
                               eval_batch_size=8)
    odd.attach_tokenizer(tokenizer)
    odd.setup("predict")
    probs = torch.cat([probabilities(model, [odd.predict_set[i] for i in range(len(odd.predict_set))])])
    assert probs.shape == (4, 3) and probs.min() >= FLOOR_TARGET
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=probs.dtype), atol=1e-5)


def test_floor_is_applied_identically_in_validation_and_prediction(trained, tmp_path):
    """val/log_loss, the calibration pass and predict_step + the pipeline's guard give the same numbers."""
    from pref_lightning.core.metrics import competition_log_loss, mix_floor

    model, _, dm = trained
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        logits = model(batch, tta_swap=True)
        predicted = model.predict_step(batch, 0)["logits"]
    written = mix_floor(predicted.softmax(-1), model.hparams.prob_floor)
    assert torch.allclose(written, model.probabilities(logits, calibrated=True), atol=1e-6)
    expected = competition_log_loss(model.probabilities(logits), batch["labels"])
    model.val_log_loss.reset()
    model.val_log_loss(model.probabilities(logits), batch["labels"])
    assert float(model.val_log_loss.compute()) == pytest.approx(float(expected), abs=1e-6)
