import lightning as L
import torch

from pref_lightning.datamodule import PreferenceDataModule
from pref_lightning.module import PreferenceModule, warmup_decay

from .conftest import TEST_TINY


def tiny_module(tokenizer, **kwargs):
    return PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                            **kwargs)


def test_forward_gives_three_logits_per_pair(tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=5)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    logits = tiny_module(tiny_tokenizer)(batch)
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()


def test_warmup_then_decay():
    values = [warmup_decay(s, 10, 100, "cosine", 0.0) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert values[10] == 1.0 and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_decay(50, 0, 100, "linear", 0.1) == 0.1 + 0.9 * 0.5


def test_optimizer_uses_separate_head_lr(tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    module = tiny_module(tiny_tokenizer, lr=1e-5, head_lr=1e-3)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["head"]["initial_lr"] == 1e-3 and groups["backbone_d1"]["initial_lr"] == 1e-5


def test_checkpoint_is_self_contained(tmp_path, tiny_tokenizer, synthetic_csv):
    from pref_lightning.backbone import tokenizer_files

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")  # fits the statistics' normalisation: the spec is complete
    module = tiny_module(tiny_tokenizer, spec=dm.spec, tokenizer_files=tokenizer_files(tiny_tokenizer, tmp_path / "tok"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored, tokenizer, spec = PreferenceModule.from_checkpoint(str(path))
    assert spec == dm.spec and spec.max_length == 32
    text = "an answer about the topic"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(module(batch), restored(batch), atol=1e-6)


def _batch(tokenizer, csv, n=6):
    dm = PreferenceDataModule(train_path=str(csv), max_length=32, batch_size=n)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_batches_carry_normalised_side_statistics(tiny_tokenizer, synthetic_csv):
    from pref_lightning.pairs import STATS_FEATURES

    batch = _batch(tiny_tokenizer, synthetic_csv)
    stats = batch["stats"]
    assert stats.shape == (2 * len(batch["labels"]), len(STATS_FEATURES))
    assert stats.abs().max() < 20 and torch.isfinite(stats).all()


def test_tta_swap_is_exact_for_symmetric_head_and_averages_otherwise(tiny_tokenizer, synthetic_csv):
    batch = _batch(tiny_tokenizer, synthetic_csv)
    torch.manual_seed(0)
    symmetric = tiny_module(tiny_tokenizer, symmetric_head=True).eval()
    with torch.no_grad():
        assert torch.allclose(symmetric(batch), symmetric(batch, tta_swap=True), atol=1e-5)
        # swapping the two sides of the batch swaps the win logits
        n = len(batch["labels"])
        order = list(range(n, 2 * n)) + list(range(n))
        swapped = {**batch, "input_ids": batch["input_ids"][order], "attention_mask": batch["attention_mask"][order],
                   "stats": batch["stats"][order]}
        assert torch.allclose(symmetric(batch)[:, [1, 0, 2]], symmetric(swapped), atol=1e-5)
        plain = tiny_module(tiny_tokenizer).eval()
        averaged = plain(batch, tta_swap=True)
        assert torch.allclose(averaged[:, [1, 0, 2]], plain(swapped, tta_swap=True), atol=1e-5)


def test_layer_lr_decay_scales_lower_layers(tiny_tokenizer, synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    config = {**TEST_TINY, "num_hidden_layers": 2}
    module = PreferenceModule(backbone="tiny", tiny_config=config, vocab_size=len(tiny_tokenizer), head_hidden=16,
                              lr=1e-4, head_lr=1e-3, layer_lr_decay=0.5, freeze_embeddings=True)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs["backbone_d2"] == 1e-4 and lrs["backbone_d1"] == 5e-5 and lrs["head"] == 1e-3
    assert lrs["backbone_d0_no_decay"] == 2.5e-5  # embedding LayerNorm still trains, at lr * 0.5 ** 2
    assert module.backbone.get_input_embeddings().weight.requires_grad is False


def test_swap_augment_mode_is_validated(tiny_tokenizer):
    import pytest

    with pytest.raises(ValueError, match="swap_augment"):
        tiny_module(tiny_tokenizer, swap_augment="sometimes")


def _fit_two_steps(tokenizer, csv_path, trainer_kwargs=None, **module_kwargs):
    dm = PreferenceDataModule(train_path=str(csv_path), max_length=32, batch_size=4)
    dm.attach_tokenizer(tokenizer)
    module = tiny_module(tokenizer, **module_kwargs)
    before = {k: v.detach().clone() for k, v in module.backbone.named_parameters()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        **(trainer_kwargs or {}))
    trainer.fit(module, dm)
    moved = [k for k, v in module.backbone.named_parameters() if not torch.equal(v, before[k])]
    return module, trainer, moved


def test_gradient_checkpointing_trains(tiny_tokenizer, synthetic_csv):
    module, trainer, moved = _fit_two_steps(tiny_tokenizer, synthetic_csv, gradient_checkpointing=True)
    assert getattr(module.backbone, "is_activation_checkpointing", None) or module.backbone.is_gradient_checkpointing
    assert trainer.global_step == 2 and moved


def test_gradient_accumulation_steps_once_per_window(tiny_tokenizer, synthetic_csv):
    _, trainer, moved = _fit_two_steps(tiny_tokenizer, synthetic_csv, {"accumulate_grad_batches": 3})
    # two optimizer steps consumed six batches
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.ready == 6 and moved


def test_compile_switch_trains_and_keeps_checkpoint_names(tmp_path, tiny_tokenizer, synthetic_csv):
    module, trainer, moved = _fit_two_steps(tiny_tokenizer, synthetic_csv, compile=True,
                                            compile_backend="aot_eager")
    assert module.backbone._compiled_call_impl is not None and moved
    # compiled in place: the state dict has the plain module's names, so checkpoints load anywhere
    assert not any("_orig_mod" in k for k in module.state_dict())
    plain = tiny_module(tiny_tokenizer)
    plain.load_state_dict(module.state_dict())


def test_ddp_padding_rows_are_left_out_of_metrics_and_predictions(tiny_tokenizer, synthetic_csv):
    """A batch with padding rows (a DDP rank short of rows): the metrics and predictions are those of
    its real rows alone; a batch of padding only adds nothing."""
    from dataclasses import replace

    from pref_lightning.collate import PairCollator

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    module = tiny_module(tiny_tokenizer).eval()
    module.log = lambda *args, **kwargs: None  # no trainer here
    collate = PairCollator(dm.encoder.pad_id)
    real, other = dm.val_set.pairs[:2], dm.val_set.pairs[2]
    with torch.no_grad():
        module.validation_step(collate(real), 0)
        expected = float(module.val_log_loss.compute()), float(module.val_accuracy.compute())
        module.val_log_loss.reset(), module.val_accuracy.reset()
        padded = collate([*real, replace(other, padding=True)])
        logits = module.validation_step(padded, 0)
        module.validation_step(collate([replace(other, padding=True)]), 1)
        assert (float(module.val_log_loss.compute()), float(module.val_accuracy.compute())) == expected
        assert logits.shape == (2, 3) and int(module.val_log_loss.count) == 2
        out = module.predict_step(padded, 0)
    assert out["index"].tolist() == [p.index for p in real] and out["logits"].shape == (2, 3)
