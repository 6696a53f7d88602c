import lightning as L
import numpy as np
import pytest
import torch

from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.module import PreferenceModule, warmup_decay

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
    from pref_lightning.data.tokenizers import tokenizer_files

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
    from pref_lightning.data.pairs import STATS_FEATURES

    batch = _batch(tiny_tokenizer, synthetic_csv)
    stats = batch["stats"]
    assert stats.shape == (2 * len(batch["labels"]), len(STATS_FEATURES))
    assert stats.abs().max() < 20 and torch.isfinite(stats).all()


@pytest.mark.parametrize("form", [True, "davidson"])
def test_tta_swap_is_exact_for_symmetric_head_and_averages_otherwise(tiny_tokenizer, synthetic_csv, form):
    batch = _batch(tiny_tokenizer, synthetic_csv)
    torch.manual_seed(0)
    symmetric = tiny_module(tiny_tokenizer, symmetric_head=form).eval()
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


def _cross_batch(tokenizer, csv, n=6, **encoding):
    dm = PreferenceDataModule(train_path=str(csv), max_length=48, batch_size=n, layout="cross", **encoding)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return dm, next(iter(dm.val_dataloader()))


def test_cross_rows_come_in_both_orders_and_tta_averages_them(tiny_tokenizer, synthetic_csv):
    _, batch = _cross_batch(tiny_tokenizer, synthetic_csv)
    n = len(batch["labels"])
    assert batch["input_ids"].shape[0] == 2 * n and batch["stats"].shape[0] == 2 * n
    torch.manual_seed(0)
    module = tiny_module(tiny_tokenizer, spec={"layout": "cross"}).eval()
    # exchanging the two orders of every pair (rows and statistics) swaps the win logits of the TTA average
    order = list(range(n, 2 * n)) + list(range(n))
    swapped = {**batch, "input_ids": batch["input_ids"][order], "attention_mask": batch["attention_mask"][order],
               "stats": batch["stats"][order]}
    with torch.no_grad():
        plain, averaged = module(batch), module(batch, tta_swap=True)
        assert plain.shape == (n, 3) and not torch.allclose(plain, averaged, atol=1e-4)
        assert torch.allclose(averaged[:, [1, 0, 2]], module(swapped, tta_swap=True), atol=1e-5)
        # the average of the (A, B) row's logits and the exchanged row's logits, classes mapped back
        alone = module({**batch, "input_ids": batch["input_ids"][n:], "attention_mask": batch["attention_mask"][n:],
                        "stats": batch["stats"][order]})
        assert torch.allclose(averaged, 0.5 * (plain + alone[:, [1, 0, 2]]), atol=1e-5)


@pytest.mark.parametrize("mode", ["random", "full", "none"])
def test_cross_layout_trains_with_each_swap_mode(tiny_tokenizer, synthetic_csv, mode):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=128, batch_size=4, layout="cross",
                              template="verdict")
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    module = tiny_module(tiny_tokenizer, spec=dm.spec, swap_augment=mode)
    before = {k: v.detach().clone() for k, v in module.backbone.named_parameters()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    assert any(not torch.equal(v, before[k]) for k, v in module.backbone.named_parameters())
    processed = module.last_processed_tokens
    batch = next(iter(dm.train_dataloader()))
    rows = 2 * len(batch["labels"]) if mode == "full" else len(batch["labels"])
    assert 0 < processed <= rows * batch["input_ids"].shape[1]


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

    from pref_lightning.data.collate import PairCollator

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


# ---- siamese sides grouped by their own lengths (model.side_groups) --------------------------------
def test_side_groups_split_minimises_processed_tokens():
    from itertools import combinations

    from pref_lightning.data.collate import side_groups

    lengths = [5, 100, 7, 90, 30, 31, 64, 2]
    assert side_groups(lengths, 1) == [[1, 3, 6, 5, 4, 2, 0, 7]]
    groups = side_groups(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(8)) and len(groups) <= 3
    cost = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    order = sorted(range(8), key=lambda i: -lengths[i])
    best = min(sum(len(p) * lengths[p[0]] for p in (order[a:b] for a, b in zip((0, *cuts), (*cuts, 8))))
               for k in range(3) for cuts in combinations(range(1, 8), k))
    assert cost == best


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_mean"])
def test_grouped_sides_give_the_old_paths_logits(tiny_tokenizer, synthetic_csv, pooling):
    """Same rows, fp32, eval mode: side_groups=4 (sides run in length groups) = side_groups=1 (one (2B, L) call)."""
    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=128, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    batch = dict(next(iter(dm.train_dataloader())))
    # right-padded sides of varied lengths (the synthetic answers all fill max_length)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for i in range(0, len(ids), 3):
        keep = 12 + 7 * i
        ids[i, keep:], mask[i, keep:] = dm.encoder.pad_id, 0
    batch.update(input_ids=ids, attention_mask=mask)
    torch.manual_seed(0)
    old = tiny_module(tiny_tokenizer, pooling=pooling, side_groups=1, spec=dm.spec).eval()
    new = tiny_module(tiny_tokenizer, pooling=pooling, side_groups=4, spec=dm.spec).eval()
    new.load_state_dict(old.state_dict())
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > lengths.min()  # the batch does have padding to save
    with torch.no_grad():
        for tta in (False, True):
            assert torch.allclose(old(batch, tta_swap=tta), new(batch, tta_swap=tta), atol=1e-5, rtol=1e-4)
    assert old.last_processed_tokens == batch["attention_mask"].numel()
    assert lengths.sum() <= new.last_processed_tokens < old.last_processed_tokens


def test_grouped_sides_train_and_count_processed_tokens(tiny_tokenizer, varied_csv):
    """train/padding_efficiency counts the token positions the backbone really ran over."""

    class Tokens(L.Callback):
        def __init__(self):
            self.real = self.processed = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.real += int(batch["attention_mask"].sum())
            self.processed += pl_module.last_processed_tokens
            # the metric's running sums (reset each epoch) are what was just added up
            assert int(pl_module.train_padding.real) == self.real
            assert int(pl_module.train_padding.processed) == self.processed

    efficiency = {}
    for groups in (1, 4):
        dm = PreferenceDataModule(train_path=str(varied_csv), max_length=128, batch_size=8)
        dm.attach_tokenizer(tiny_tokenizer)
        module = tiny_module(tiny_tokenizer, side_groups=groups)
        tokens = Tokens()
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[tokens])
        trainer.fit(module, dm)
        assert trainer.global_step == 3
        efficiency[groups] = tokens.real / tokens.processed
    assert efficiency[1] < efficiency[4] <= 1.0


def test_side_groups_is_validated(tiny_tokenizer):
    with pytest.raises(ValueError, match="side_groups"):
        tiny_module(tiny_tokenizer, side_groups=0)


def test_token_budget_training_schedule_counts_the_real_steps(tiny_tokenizer, varied_csv):
    """data.max_tokens: variable rows per batch, and the LR schedule's length is the steps really taken."""
    dm = PreferenceDataModule(train_path=str(varied_csv), max_length=48, max_tokens=600)
    dm.attach_tokenizer(tiny_tokenizer)
    module = tiny_module(tiny_tokenizer)
    rows = []

    class Rows(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rows.append(len(batch["labels"]))
            assert batch["attention_mask"].numel() <= 600 or len(batch["labels"]) == 1

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", callbacks=[Rows()])
    trainer.fit(module, dm)
    assert trainer.global_step == trainer.estimated_stepping_batches == len(rows)
    assert len(set(rows)) > 1 and sum(rows) == 2 * len(dm.train_set)


def test_predictions_with_a_token_budget_equal_those_with_a_batch_size(tiny_tokenizer, synthetic_csv):
    from pref_lightning.predict.prediction import gather_predictions

    dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=48, batch_size=8)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    module = tiny_module(tiny_tokenizer, spec=dm.spec).eval()
    out = {}
    for key, kwargs in (("rows", {"eval_batch_size": 7}), ("tokens", {"eval_max_tokens": 2000})):
        predict = PreferenceDataModule(predict_path=str(synthetic_csv), spec=dm.spec, **kwargs)
        predict.attach_tokenizer(tiny_tokenizer)
        predict.setup("predict")
        trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
        outputs = trainer.predict(module, datamodule=predict)
        out[key] = (gather_predictions(outputs, len(predict.predict_set)), len(outputs))
    assert out["tokens"][1] != out["rows"][1]  # other batches
    assert np.allclose(out["rows"][0], out["tokens"][0], atol=1e-5)


def test_bad_token_budget_is_a_user_error():
    from pref_lightning.core.errors import UserError

    with pytest.raises(UserError, match="data.max_tokens"):
        PreferenceDataModule(max_tokens=-5)


def test_evaluation_policy_is_set_through_one_method(tiny_tokenizer, synthetic_csv):
    """TTA, temperature (and whether prediction applies it) and the floor change through
    `set_evaluation` only: checked there, read by validation, calibration and prediction."""
    from pref_lightning.core.errors import UserError

    batch = _batch(tiny_tokenizer, synthetic_csv, n=4)
    module = tiny_module(tiny_tokenizer).eval()
    with torch.no_grad():
        plain, swapped = module(batch), module(batch, tta_swap=True)
        assert torch.allclose(module.predict_step(batch, 0)["logits"], swapped)
        module.set_evaluation(tta_swap=False, temperature=2.0)
        assert module.temperature == 2.0 and torch.allclose(module.predict_step(batch, 0)["logits"], plain / 2)
        module.set_evaluation(calibrated=False)
        assert torch.allclose(module.predict_step(batch, 0)["logits"], plain)
    module.set_evaluation(prob_floor=0.0)
    assert module.probabilities(torch.tensor([[100.0, 0.0, 0.0]]))[0, 1] == 0.0
    assert module.evaluation.temperature == 2.0 and not module.evaluation.tta_swap  # the rest kept
    with pytest.raises(UserError, match="model.prob_floor"):
        module.set_evaluation(prob_floor=0.5)
    with pytest.raises(UserError, match="temperature"):
        module.set_evaluation(temperature=0.0)
    with pytest.raises(AttributeError):
        module.temperature = 1.5  # not an attribute to assign from outside
