"""One evaluation pass (issue 12): after fitting, the backbone runs once per validation batch, and the
logits calibration uses are the ones Lightning's validation loop computed."""

import lightning as L
import torch

from pref_lightning.core.metrics import competition_log_loss
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.module import PreferenceModule
from pref_lightning.train.training import calibrate, validate_best

from .conftest import TEST_TINY


def fitted(tokenizer, csv, **trainer_kwargs):
    """(datamodule, tiny model, trainer) after a few training steps."""
    dm = PreferenceDataModule(train_path=str(csv), max_length=32, batch_size=16, eval_batch_size=8)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        enable_model_summary=False, **trainer_kwargs)
    trainer.fit(model, dm)
    return dm, model, trainer

def test_backbone_runs_once_per_validation_batch_and_calibration_reuses_the_loop(tiny_tokenizer, synthetic_csv):
    dm, model, trainer = fitted(tiny_tokenizer, synthetic_csv, max_steps=3, num_sanity_val_steps=0)

    calls = []
    seen = []
    hook = model.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
    original_step = model.validation_step

    def recording_step(batch, batch_idx):
        logits = original_step(batch, batch_idx)
        seen.append((batch["index"].clone(), logits.detach().clone()))
        return logits

    model.validation_step = recording_step
    results, logits, labels = validate_best(trainer, model, dm, None)
    metrics = calibrate(model, logits, labels, None)
    hook.remove()

    n_batches = len(dm.val_dataloader())
    assert len(calls) == n_batches  # validation only: calibration ran no pass of its own
    assert len(labels) == len(dm.val_set)
    index = torch.cat([i for i, _ in seen])
    expected = torch.cat([x for _, x in seen])[torch.argsort(index)]
    assert torch.equal(logits, expected.float())
    assert abs(metrics["val_log_loss_uncalibrated"] - results["val/log_loss"]) < 1e-5
    assert abs(float(competition_log_loss(model.probabilities(logits), labels)) - results["val/log_loss"]) < 1e-5


def test_the_final_pass_scores_every_row_even_with_limited_validation_during_fitting(tiny_tokenizer, synthetic_csv):
    dm, model, trainer = fitted(tiny_tokenizer, synthetic_csv, max_steps=2, limit_val_batches=1)
    results, logits, labels = validate_best(trainer, model, dm, None)
    assert len(labels) == len(dm.val_set) > 8 and logits.shape == (len(dm.val_set), 3)
    assert abs(float(competition_log_loss(model.probabilities(logits), labels)) - results["val/log_loss"]) < 1e-5
