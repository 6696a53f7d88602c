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
    assert groups["head"]["initial_lr"] == 1e-3 and groups["backbone"]["initial_lr"] == 1e-5


def test_checkpoint_is_self_contained(tmp_path, tiny_tokenizer, synthetic_csv):
    from pref_lightning.backbone import tokenizer_files

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    module = tiny_module(tiny_tokenizer)
    module.tokenizer_files = tokenizer_files(tiny_tokenizer, tmp_path / "tok")
    module.data_settings = {"max_length": 32, "prompt_fraction": 0.3}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored, tokenizer, settings = PreferenceModule.from_checkpoint(str(path))
    assert settings["max_length"] == 32
    text = "an answer about the topic"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(module(batch), restored(batch), atol=1e-6)
