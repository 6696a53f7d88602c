"""Training losses (losses.py): tie-less rows, per-row weights, soft targets, label smoothing; the teacher file."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pref_lightning.core.errors import UserError
from pref_lightning.core.losses import mix_targets, preference_loss, row_losses, sharpen
from pref_lightning.data.collate import PairCollator
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.pairs import EncodedPair
from pref_lightning.data.records import DataError
from pref_lightning.data.sources import parse_sources
from pref_lightning.data.teacher import read_teacher

LOGITS = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.9, -1.0], [-0.3, 0.1, 0.8], [0.5, 0.5, 0.0]])
LABELS = torch.tensor([0, 1, 2, 1])


def nll(p: float) -> float:
    return -math.log(p)


def test_conditional_loss_of_tie_less_rows_is_the_closed_form():
    ties = torch.tensor([True, False, True, False])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    p = LOGITS.softmax(-1)
    expected = [nll(p[0, 0]), nll(p[1, 1] / (p[1, 0] + p[1, 1])), nll(p[2, 2]), nll(p[3, 1] / (p[3, 0] + p[3, 1]))]
    assert row_losses(LOGITS, LABELS, ties).tolist() == pytest.approx(expected, abs=1e-6)
    loss = preference_loss(LOGITS, LABELS, ties, weight)
    assert float(loss) == pytest.approx(sum(w * e for w, e in zip(weight.tolist(), expected)) / 4, abs=1e-6)
    # no ties / no weights: exactly the plain cross-entropy of before
    assert float(preference_loss(LOGITS, LABELS)) == pytest.approx(float(F.cross_entropy(LOGITS, LABELS)), abs=1e-7)


def test_tie_less_rows_give_the_tie_logit_exactly_zero_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 0])
    preference_loss(logits, labels, torch.zeros(4, dtype=torch.bool)).backward()
    assert logits.grad[:, 2].abs().max().item() == 0.0
    assert logits.grad[:, :2].abs().min().item() > 0
    # a mixed batch: only the rows that can tie move the tie logit
    logits.grad = None
    preference_loss(logits, LABELS, torch.tensor([True, False, True, False])).backward()
    assert logits.grad[[1, 3], 2].abs().max().item() == 0.0 and logits.grad[[0, 2], 2].abs().min().item() > 0


def test_soft_targets_are_the_mixed_closed_form():
    teacher = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [np.nan] * 3])
    w = 0.3
    targets = torch.from_numpy(mix_targets(LABELS.numpy(), teacher, w))
    logp = LOGITS.log_softmax(-1)
    expected = []
    for i in range(4):
        hard = -logp[i, LABELS[i]].item()
        soft = hard if i == 3 else -(torch.from_numpy(teacher[i]).float() * logp[i]).sum().item()  # row 3: no teacher
        expected.append((1 - w) * hard + w * soft)
    assert row_losses(LOGITS, LABELS, targets=targets).tolist() == pytest.approx(expected, abs=1e-6)
    # a tie-less row with a teacher: CE over A/B to the teacher's A/B part renormalised
    ties = torch.tensor([True, False, True, True])
    targets = torch.from_numpy(mix_targets(LABELS.numpy(), teacher, w, ties.numpy()))
    p_ab = LOGITS[1, :2].log_softmax(-1).numpy()
    expected = (1 - w) * -p_ab[1] + w * -(p_ab * teacher[1, :2] / teacher[1, :2].sum()).sum()
    assert row_losses(LOGITS, LABELS, ties, targets)[1].item() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_is_the_trivial_soft_target():
    eps = 0.1
    smoothed = torch.full((4, 3), eps / 3) + (1 - eps) * F.one_hot(LABELS, 3)
    expected = -(smoothed * LOGITS.log_softmax(-1)).sum(1)
    assert row_losses(LOGITS, LABELS, label_smoothing=eps).tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_sharpen_is_a_temperature_on_logits():
    logits = np.array([[2.0, 0.5, -1.0]])
    probs = np.exp(logits) / np.exp(logits).sum()
    for t in (0.5, 2.0):
        expected = np.exp(logits / t) / np.exp(logits / t).sum()
        assert sharpen(probs, t) == pytest.approx(expected)
    with pytest.raises(UserError, match="teacher_temperature"):
        sharpen(probs, 0)


def test_collate_carries_ties_weights_and_targets():
    def pair(label, **kw):
        return EncodedPair(np.arange(1, 4, dtype=np.int32), np.arange(1, 3, dtype=np.int32), label, 0, **kw)

    plain = PairCollator(pad_id=0)([pair(0), pair(1)])
    assert not {"ties", "weight", "targets"} & set(plain)  # nothing new unless used
    batch = PairCollator(pad_id=0)([pair(0, ties=False, weight=0.5, target=np.array([1, 0, 0], np.float32)),
                                    pair(2, target=np.array([0.2, 0.2, 0.6], np.float32))])
    assert batch["ties"].tolist() == [False, True] and batch["weight"].tolist() == [0.5, 1.0]
    assert batch["targets"].shape == (2, 3) and batch["targets"].dtype == torch.float32


def test_module_swap_keeps_tie_less_rows_tie_less_and_swaps_targets(local_backbone_dir, tiny_tokenizer):
    """A training step with random swaps equals the closed form on the swapped logits and labels."""
    from pref_lightning.model.module import PreferenceModule

    model = PreferenceModule(backbone=str(local_backbone_dir), swap_augment="random", use_text_stats=False)
    model.eval()
    ids = tiny_tokenizer(["a b c", "d e", "f g h i", "j"])["input_ids"]
    pairs = [EncodedPair(np.array(ids[i], np.int32), np.array(ids[3 - i], np.int32), label, i,
                         ties=label != 2 and i % 2 == 1, weight=1.0 + i,
                         target=np.array([0.5, 0.3, 0.2], np.float32)) for i, label in enumerate([0, 1, 2, 0])]
    batch = PairCollator(tiny_tokenizer.pad_token_id)(pairs)
    captured = {}
    model._log_train = lambda logits, labels, loss: captured.update(logits=logits, labels=labels, loss=loss) or loss
    model.training_step(batch, 0)
    flip = torch.rand(4, generator=model._augment_generator(0)) < 0.5
    swap = torch.tensor([1, 0, 2])
    targets = torch.where(flip[:, None], batch["targets"][:, swap], batch["targets"])
    assert captured["labels"].tolist() == torch.where(flip, swap[batch["labels"]], batch["labels"]).tolist()
    expected = preference_loss(captured["logits"], captured["labels"], batch["ties"], batch["weight"], targets)
    assert captured["loss"].item() == pytest.approx(expected.item(), abs=1e-6)


# ---- data: sources' ties and loss weights, the teacher file -----------------------------------------
def kaggle_frame(n, prefix="t", start=0, ties=True):
    rows = []
    for i in range(start, start + n):
        label = i % 3 if ties else i % 2
        rows.append({"id": f"{prefix}{i}", "prompt": json.dumps([f"Question {prefix} {i}?"]),
                     "response_a": json.dumps([f"answer a {i}"]), "response_b": json.dumps([f"answer b {i} " * (i % 4)]),
                     "winner_model_a": int(label == 0), "winner_model_b": int(label == 1),
                     "winner_tie": int(label == 2)})
    return pd.DataFrame(rows)


@pytest.fixture
def files(tmp_path):
    kaggle_frame(60).to_csv(tmp_path / "train.csv", index=False)
    kaggle_frame(20, prefix="n", ties=False).to_csv(tmp_path / "noties.csv", index=False)
    kaggle_frame(12, prefix="w").to_csv(tmp_path / "withties.csv", index=False)
    return tmp_path


def test_sources_ties_detected_or_declared_and_loss_weights(files, tiny_tokenizer):
    dm = PreferenceDataModule(train_path=str(files / "train.csv"), val_fraction=0.2, split_seed=1,
                              sources=[str(files / "noties.csv"), {"path": str(files / "withties.csv"),
                                                                    "loss_weight": 0.25}])
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    noties, withties = dm.data_counts["sources"]
    assert (noties["ties"], noties["ties_from"], withties["ties"], withties["loss_weight"]) == (False, "labels", True, 0.25)
    assert noties["class_prior"] == [0.5, 0.5, 0.0] and len(dm.data_counts["train_file"]["class_prior"]) == 3
    by_id = dict(zip(dm.train_ids, dm.train_set.pairs))
    assert not by_id["n3"].ties and by_id["w3"].ties and by_id["t3"].ties
    assert (by_id["n3"].weight, by_id["w3"].weight, by_id["t3"].weight) == (1.0, 0.25, 1.0)
    # the prior the tie-aware loss fits: P(tie) from the rows that can tie only
    labels, ties = dm.train_labels, np.array([p.ties for p in dm.train_set.pairs])
    assert dm.train_prior[2] == pytest.approx((labels[ties] == 2).mean())
    assert dm.train_prior.sum() == pytest.approx(1.0)
    batch = PairCollator(0)(dm.train_set.pairs[-40:])
    assert "ties" in batch and "weight" in batch


def test_declared_tie_less_source_with_ties_is_an_error(files):
    dm = PreferenceDataModule(train_path=str(files / "train.csv"), val_fraction=0.2,
                              sources=[{"path": str(files / "withties.csv"), "ties": False}])
    with pytest.raises(UserError, match=r"withties.csv.*ties: false.*first id=w2"):
        dm.load_records()
    with pytest.raises(UserError, match="ties"):
        parse_sources([{"path": "x.csv", "ties": "no"}])
    with pytest.raises(UserError, match="loss_weight"):
        parse_sources([{"path": "x.csv", "loss_weight": -1}])


def write_teacher(path, ids, rng):
    probs = rng.dirichlet([1, 1, 1], size=len(ids))
    frame = pd.DataFrame({"id": ids, "winner_model_a": probs[:, 0], "winner_model_b": probs[:, 1],
                          "winner_tie": probs[:, 2]})
    frame.to_csv(path, index=False, float_format="%.8g")
    return frame


def test_teacher_joined_by_id_mixed_with_the_hard_label(files, tiny_tokenizer):
    rows = kaggle_frame(60)
    teacher = write_teacher(files / "teacher.csv", rows["id"][::-1].tolist(), np.random.default_rng(0))
    dm = PreferenceDataModule(train_path=str(files / "train.csv"), val_fraction=0.2, teacher_path=str(files / "teacher.csv"),
                              teacher_weight=0.4)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    table = teacher.set_index("id")
    for row_id, pair in zip(dm.train_ids, dm.train_set.pairs):
        expected = 0.6 * np.eye(3)[pair.label] + 0.4 * table.loc[row_id].to_numpy()
        assert pair.target == pytest.approx(expected, abs=1e-6)
    assert dm.data_counts["teacher"]["training_rows_matched"] == len(dm.train_set)
    assert all(p.target is None for p in dm.val_set.pairs)  # validation stays hard-labelled


def test_teacher_missing_ids_are_named_or_trained_hard(files, tiny_tokenizer):
    ids = kaggle_frame(60)["id"].tolist()
    write_teacher(files / "teacher.csv", ids[7:], np.random.default_rng(1))  # t0..t6 missing
    common = {"train_path": str(files / "train.csv"), "val_fraction": 0.2, "teacher_path": str(files / "teacher.csv")}
    dm = PreferenceDataModule(**common)
    dm.attach_tokenizer(tiny_tokenizer)
    with pytest.raises(DataError, match=r"teacher.csv: \d+ of \d+ training rows have no teacher row \(id t\d"):
        dm.setup("fit")
    dm = PreferenceDataModule(**common, teacher_missing="hard", teacher_weight=1.0)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    for row_id, pair in zip(dm.train_ids, dm.train_set.pairs):
        if row_id in ids[:7]:
            assert pair.target.tolist() == np.eye(3)[pair.label].tolist()  # hard label only
    assert dm.data_counts["teacher"]["training_rows_hard_only"] == sum(i in ids[:7] for i in dm.train_ids) > 0


def test_teacher_file_checks(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "winner_model_a": [0.5, 0.7], "winner_model_b": [0.3, 0.2],
                          "winner_tie": [0.2, 0.1]})
    frame.to_csv(tmp_path / "ok.csv", index=False)
    soft, counts = read_teacher(tmp_path / "ok.csv", ["b", "a"])
    assert soft == pytest.approx(np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])) and counts["training_rows_matched"] == 2
    frame.assign(winner_tie=["0.2", "x"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="bad.csv: row id=b: column winner_tie has 'x'"):
        read_teacher(tmp_path / "bad.csv", ["a"])
    frame.assign(winner_tie=[0.2, 0.5]).to_csv(tmp_path / "sum.csv", index=False)
    with pytest.raises(DataError, match="sum.csv: row id=b: .* sum to 1.4"):
        read_teacher(tmp_path / "sum.csv", ["a"])
    frame.drop(columns="winner_tie").to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(DataError, match="cols.csv: missing column"):
        read_teacher(tmp_path / "cols.csv", ["a"])


def test_anchor_fit_is_tie_aware():
    """Tie-less rows fitted plainly pull P(tie) down; fitted with the conditional loss they do not."""
    from pref_lightning.model.anchor import anchor_logits, fit_anchor

    rng = np.random.default_rng(0)
    n_file, n_extra = 300, 900
    stats_a, stats_b = rng.normal(size=(n_file + n_extra, 4)), rng.normal(size=(n_file + n_extra, 4))
    labels = np.concatenate([rng.choice(3, n_file, p=[0.35, 0.35, 0.3]), rng.choice(2, n_extra)])
    ties = np.arange(n_file + n_extra) < n_file

    def mean_tie(anchor):
        logits = anchor_logits(anchor, stats_a[:n_file], stats_b[:n_file])
        return float(torch.from_numpy(logits).softmax(-1)[:, 2].mean())

    plain = mean_tie(fit_anchor(stats_a, stats_b, labels))
    aware = mean_tie(fit_anchor(stats_a, stats_b, labels, ties=ties, weight=np.ones(len(labels))))
    assert plain < 0.12 and abs(aware - (labels[:n_file] == 2).mean()) < 0.03
