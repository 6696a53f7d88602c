"""The anchored head (issue 13): step 0 scores the statistics regression exactly; training adds to it."""

import lightning as L
import numpy as np
import pytest
import torch

from pref_lightning.core.metrics import competition_log_loss, mix_floor, softmax
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.anchor import anchor_logits, fit_anchor, fit_anchor_on
from pref_lightning.model.module import PreferenceModule

from .conftest import TEST_TINY


def test_fitted_offset_equals_the_regression_it_folds():
    from pref_lightning.data.text_stats import fit_logistic_regression, predict_proba

    rng = np.random.default_rng(0)
    sa, sb = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    labels = (sa[:, 0] < sb[:, 0]).astype(np.int64)
    labels[::7] = 2
    anchor = fit_anchor(sa, sb, labels, l2=0.1)
    X = np.concatenate([np.concatenate([sa, sb, sa - sb, abs(sa - sb)], 1),
                        np.concatenate([sb, sa, sb - sa, abs(sb - sa)], 1)])
    y = np.concatenate([labels, np.array([1, 0, 2])[labels]])
    expected = predict_proba(fit_logistic_regression(X, y, l2=0.1), X[:300])
    assert np.allclose(softmax(anchor_logits(anchor, sa, sb, tta_swap=False)), expected, atol=1e-6)
    assert anchor["l2"] == 0.1 and anchor["features"] == "a,b,diff,absdiff"
    # an anchor written before |a - b| (no "features" key) keeps its three-part features
    old = {"weight": np.zeros((12, 3)).tolist(), "bias": [0.5, 0.0, -0.5]}
    assert np.allclose(anchor_logits(old, sa, sb, tta_swap=False), [0.5, 0.0, -0.5])


def test_penalty_is_chosen_by_grouped_cross_validation():
    from pref_lightning.model.anchor import L2_GRID, choose_l2

    rng = np.random.default_rng(1)
    n = 600
    sa, sb = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    labels = np.where(rng.random(n) < 0.3, 2, (sa[:, 0] + rng.normal(size=n) < sb[:, 0]).astype(np.int64))
    groups = [str(i // 2) for i in range(n)]
    l2, losses = choose_l2(sa, sb, labels, groups)
    assert set(losses) == set(L2_GRID) and l2 in L2_GRID and losses[l2] == min(losses.values())
    anchor = fit_anchor(sa, sb, labels, groups=groups)
    assert anchor["l2"] == l2 and anchor["cv_log_loss"] == {str(k): v for k, v in losses.items()}
    # noise features only: the strongest penalty wins (the regression stays near the prior)
    noise = (rng.random(n) * 3).astype(np.int64)
    assert choose_l2(sa, sb, noise, groups)[0] == max(L2_GRID)
    assert choose_l2(sa[:20], sb[:20], labels[:20], groups[:20]) == (L2_GRID[len(L2_GRID) // 2], {})


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=16, eval_batch_size=64)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    anchor = fit_anchor_on(dm)
    sa, sb, labels = dm.split_statistics("val")
    probs = mix_floor(softmax(anchor_logits(anchor, sa, sb)), 0.002)
    baseline = float(competition_log_loss(torch.from_numpy(probs), torch.from_numpy(labels)))
    return dm, anchor, baseline


def anchored(tokenizer, anchor, **kwargs):
    return PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                            anchor_head=True, anchor=anchor, **kwargs)


def test_step_zero_scores_the_baseline_and_the_checkpoint_reproduces_it(tiny_tokenizer, setup, tmp_path):
    dm, anchor, baseline = setup
    from pref_lightning.data.tokenizers import tokenizer_files

    model = anchored(tiny_tokenizer, anchor, tokenizer_files=tokenizer_files(tiny_tokenizer))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False, max_steps=0)
    trainer.fit(model, dm)  # no step: attaches the trainer so that a checkpoint can be written
    step0 = trainer.validate(model, dm, verbose=False)[0]["val/log_loss"]
    assert step0 == pytest.approx(baseline, abs=1e-4)
    path = tmp_path / "anchored.ckpt"
    trainer.save_checkpoint(path)
    restored, _, _ = PreferenceModule.from_checkpoint(str(path))
    again = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False)
    assert again.validate(restored, dm, verbose=False)[0]["val/log_loss"] == pytest.approx(baseline, abs=1e-4)


def test_training_moves_the_head_but_not_a_frozen_anchor(tiny_tokenizer, setup):
    dm, anchor, _ = setup
    model = anchored(tiny_tokenizer, anchor, lr=1e-3, head_lr=1e-3)
    before = model.anchor.linear.weight.detach().clone()
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu", enable_model_summary=False)
    trainer.fit(model, dm)
    assert torch.equal(model.anchor.linear.weight, before)
    assert any(layer.weight.abs().sum() > 0 for layer in model.head.modules() if isinstance(layer, torch.nn.Linear))


def test_anchor_needs_statistics(tiny_tokenizer, setup):
    with pytest.raises(ValueError, match="use_text_stats"):
        anchored(tiny_tokenizer, setup[1], use_text_stats=False)


def test_a_model_behind_its_baseline_falls_back_to_it(tiny_tokenizer, setup, tmp_path):
    from pref_lightning.data.tokenizers import tokenizer_files
    from pref_lightning.model.head import output_layers
    from pref_lightning.train.training import fall_back_to_baseline, validate_best

    dm, anchor, baseline = setup
    model = anchored(tiny_tokenizer, anchor, reference={"baseline_log_loss": baseline},
                     tokenizer_files=tokenizer_files(tiny_tokenizer))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False, max_steps=0)
    trainer.fit(model, dm)
    torch.manual_seed(0)
    with torch.no_grad():  # a head that learned only noise: confidently wrong, and an anchor that moved
        for layer in output_layers(model.head):
            layer.weight.normal_(0, 3.0)
        model.anchor.linear.weight.add_(0.5)
    path = str(tmp_path / "best.ckpt")
    trainer.save_checkpoint(path, weights_only=True)
    results, logits, labels = validate_best(trainer, model, dm, path)
    assert results["val/log_loss"] > baseline + 0.01
    kept, results, logits, labels = fall_back_to_baseline(trainer, model, dm, path, results, logits, labels)
    assert kept == {"trained_log_loss": pytest.approx(kept["trained_log_loss"]), "baseline_log_loss": baseline}
    assert kept["trained_log_loss"] > baseline + 0.01
    assert results["val/log_loss"] == pytest.approx(baseline, abs=1e-4) and len(logits) == len(dm.val_set)
    restored, _, _ = PreferenceModule.from_checkpoint(path)  # the rewritten checkpoint is the baseline
    again = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False)
    assert again.validate(restored, dm, verbose=False)[0]["val/log_loss"] == pytest.approx(baseline, abs=1e-4)
    # a model at (or ahead of) its baseline is kept as it is
    assert fall_back_to_baseline(trainer, model, dm, path, results, logits, labels)[0] is None


def test_anchor_blend_evaluates_the_mixture_and_trains_the_whole_model(tiny_tokenizer, setup):
    """model.anchor_blend=w: validation and prediction read w * P(trained) + (1 - w) * P(anchor alone)
    exactly; training steps see the full logits."""
    dm, anchor, _ = setup
    full = anchored(tiny_tokenizer, anchor)
    blended = anchored(tiny_tokenizer, anchor, anchor_blend=0.5)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking head
        for layer in output_layers_of(full):
            layer.weight.normal_(0, 1.0)
    blended.load_state_dict(full.state_dict())
    batch = dm.collator()(dm.val_set.pairs[:16])
    full.eval()
    blended.eval()
    p_full = full(batch).softmax(-1)
    a, b, sa, sb = full.side_vectors(batch)
    k = dm.spec.n_stats
    p_anchor = full.anchor(sa[..., :k], sb[..., :k]).softmax(-1)
    assert torch.allclose(blended(batch).softmax(-1), 0.5 * p_full + 0.5 * p_anchor, atol=1e-6)
    assert not torch.allclose(p_full, p_anchor, atol=1e-3)
    blended.train()
    full.train()
    assert torch.allclose(blended(batch), full(batch), atol=1e-6)
    with pytest.raises(ValueError, match="anchor_blend"):
        anchored(tiny_tokenizer, anchor, anchor_blend=1.5)


def output_layers_of(model):
    from pref_lightning.model.head import output_layers

    return output_layers(model.head)
