"""PriorGuard: hand-made logits through its hooks, real tiny fits that collapse or learn, DDP on CPU."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.module import PreferenceModule
from pref_lightning.train.prior_guard import PriorCollapseWarning, PriorGuard

from .conftest import REPO, TEST_TINY

HISTOGRAM = re.compile(r"A \d+ / B \d+ / tie \d+")


@pytest.fixture
def one_thread():
    # a tiny model runs ~50x slower with 2 intra-op threads on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- hooks fed by hand -------------------------------------------------------------------------
class FakeStrategy:
    def reduce(self, tensor, reduce_op="mean"):
        assert reduce_op == "sum"
        return tensor


def fake_trainer(fn=TrainerFn.FITTING):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-5, "name": "backbone_d0"},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2e-5, "name": "backbone_d1"},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "head"}]
    return SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=fn), strategy=FakeStrategy(),
                           is_global_zero=True, current_epoch=0, global_step=40, should_stop=False,
                           optimizers=[torch.optim.SGD(groups, lr=1e-3)])


class FakeModule(torch.nn.Module):
    def __init__(self, train_prior=(), reference=None):
        super().__init__()
        self.backbone = torch.nn.Linear(3, 2)
        self.head = torch.nn.Linear(2, 3)
        self.train_prior = list(train_prior)
        self.reference = dict(reference or {})
        self.logged: dict[str, float] = {}

    @property
    def device(self):
        return torch.device("cpu")

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


def run_validation(guard, trainer, module, logits, labels, batch_size=16):
    guard.on_validation_epoch_start(trainer, module)
    for i, start in enumerate(range(0, len(labels), batch_size)):
        rows = slice(start, start + batch_size)
        guard.on_validation_batch_end(trainer, module, logits[rows], {"labels": labels[rows]}, i)
    guard.on_validation_epoch_end(trainer, module)


PRIOR = (0.5, 0.3, 0.2)
LABELS = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
PRIOR_LOGITS = torch.tensor(PRIOR).log().expand(100, 3).clone()


def test_constant_prior_logits_are_diagnosed_once_as_collapse(caplog):
    guard = PriorGuard(patience=2, min_gain=0.01, action="warn")
    trainer, module = fake_trainer(), FakeModule(PRIOR, {"prior_log_loss": 1.03})

    with warnings.catch_warnings():
        warnings.simplefilter("error", PriorCollapseWarning)
        run_validation(guard, trainer, module, PRIOR_LOGITS, LABELS)
    stats = guard.last_stats
    prior_log_loss = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert stats["prior_log_loss"] == pytest.approx(prior_log_loss)  # train prior scored on the rows seen
    assert stats["val_log_loss"] == pytest.approx(prior_log_loss) and abs(stats["gain"]) < 1e-9
    assert stats["pred_entropy"] == pytest.approx(stats["prior_entropy"]) and stats["collapsed"]
    assert stats["pred_histogram"] == [100, 0, 0] and stats["label_histogram"] == [50, 30, 20]
    assert stats["mean_probs"] == pytest.approx(list(PRIOR))
    assert module.logged["val/gain_over_prior"] == pytest.approx(0.0, abs=1e-9)
    assert module.logged["val/pred_entropy"] == pytest.approx(stats["prior_entropy"])
    assert guard.bad_checks == 1 and not guard.triggered and guard.last_diagnosis is None

    with caplog.at_level(logging.WARNING, logger="pref_lightning.train.prior_guard"), \
            pytest.warns(PriorCollapseWarning, match="stuck at the class prior"):
        run_validation(guard, trainer, module, PRIOR_LOGITS, LABELS)
    text = guard.last_diagnosis
    assert guard.triggered and not trainer.should_stop  # action=warn
    assert caplog.records and caplog.records[-1].getMessage() == text
    assert "A 100 / B 0 / tie 0" in text and "collapsed: it predicts the prior" in text
    assert "vs prior (train split): A 0.500 / B 0.300 / tie 0.200" in text
    assert "head 1.00e-03" in text and "backbone top (backbone_d1) 2.00e-05" in text
    assert "latest gradient norms: not measured yet" in text and "step 40" in text
    for hint in ("model.lr", "model.head_lr", "warmup", "more epochs"):
        assert hint in text
    # fp16, dropout and data advice only where they would change something (tests/test_cli.py)
    assert "bf16" not in text and "dropout" not in text
    assert "callbacks.prior_guard.action=stop" in text

    with warnings.catch_warnings():  # the streak goes on: no second diagnosis
        warnings.simplefilter("error", PriorCollapseWarning)
        run_validation(guard, trainer, module, PRIOR_LOGITS, LABELS)
    assert guard.bad_checks == 3

    learned = 4.0 * torch.nn.functional.one_hot(LABELS, 3).float()
    run_validation(guard, trainer, module, learned, LABELS)
    assert guard.bad_checks == 0 and module.logged["val/gain_over_prior"] > 0.5
    assert not guard.last_stats["collapsed"]


def test_stop_action_sanity_check_validate_stage_and_uniform_fallback():
    guard = PriorGuard(patience=1, action="stop")
    module = FakeModule(train_prior=(), reference={"prior_log_loss": 1.05})
    uniform = torch.zeros(100, 3)

    sanity = fake_trainer()
    sanity.sanity_checking = True
    run_validation(guard, sanity, module, uniform, LABELS)
    assert guard.last_stats is None and module.logged == {}

    validating = fake_trainer(TrainerFn.VALIDATING)  # trainer.validate(): figures logged, nothing judged
    run_validation(guard, validating, module, uniform, LABELS)
    assert module.logged["val/gain_over_prior"] == pytest.approx(1.05 - math.log(3))
    assert guard.bad_checks == 0 and not guard.triggered

    trainer = fake_trainer()
    with pytest.warns(PriorCollapseWarning):
        run_validation(guard, trainer, module, uniform, LABELS)
    assert guard.triggered and trainer.should_stop
    assert guard.last_stats["prior"] == pytest.approx([1 / 3] * 3)  # no train prior on the module
    assert "uniform (module has no train_prior)" in guard.last_diagnosis
    assert "stopping training" in guard.last_diagnosis


def test_gradient_norms_every_n_steps():
    guard = PriorGuard(grad_norm_every=25)
    trainer, module = fake_trainer(), FakeModule(PRIOR)
    for p in module.head.parameters():
        p.grad = torch.full_like(p, 0.5)
    expected = 0.5 * math.sqrt(sum(p.numel() for p in module.head.parameters()))
    trainer.global_step = 50
    guard.on_before_optimizer_step(trainer, module, trainer.optimizers[0])
    assert guard.grad_norms == pytest.approx({"head": expected, "backbone": 0.0}) and guard.grad_norm_step == 50
    for p in module.backbone.parameters():
        p.grad = torch.ones_like(p)
    trainer.global_step = 51  # not a measuring step: the latest values stay
    guard.on_before_optimizer_step(trainer, module, trainer.optimizers[0])
    assert guard.grad_norms["backbone"] == 0.0 and guard.grad_norm_step == 50


def test_action_and_counts_are_validated():
    with pytest.raises(ValueError, match=r"callbacks\.prior_guard\.action='halt'.*warn, stop"):
        PriorGuard(action="halt")
    with pytest.raises(ValueError, match="patience"):
        PriorGuard(patience=0)


def test_default_callbacks_config_has_the_guard():
    conf = str(REPO / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        default = compose(config_name="train")
        stop = compose(config_name="train", overrides=["callbacks.prior_guard.action=stop"])
        bad = compose(config_name="train", overrides=["callbacks.prior_guard.action=halt"])
    guard = instantiate(default.callbacks.prior_guard)
    assert isinstance(guard, PriorGuard) and guard.action == "warn"
    assert (guard.patience, guard.min_gain, guard.entropy_tolerance, guard.grad_norm_every) == (2, 0.01, 0.05, 25)
    assert default.callbacks.model_checkpoint.monitor == "val/log_loss"  # existing entries kept
    assert instantiate(stop.callbacks.prior_guard).action == "stop"
    with pytest.raises(Exception, match=r"callbacks\.prior_guard\.action"):
        instantiate(bad.callbacks.prior_guard)


# ---- real tiny fits ----------------------------------------------------------------------------
CHECK_EVERY, BATCHES, EPOCHS = 6, 12, 4  # up to 8 validation checks and 48 optimizer steps


def fit(tmp_path, tokenizer, csv, guard, use_text_stats, shuffle_labels):
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule(train_path=str(csv), max_length=32, batch_size=16)
    dm.attach_tokenizer(tokenizer)
    dm.load_records()
    if shuffle_labels:  # labels independent of the texts: nothing beyond the prior can be learned
        rng = np.random.default_rng(0)
        for record in dm.train_records + dm.val_records:
            record.label = int(rng.choice(3, p=[0.45, 0.35, 0.2]))
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                             use_text_stats=use_text_stats, lr=1e-3, head_lr=1e-2, warmup_ratio=0.0,
                             reference=dm.validation_reference(), train_prior=dm.train_prior.tolist())
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, limit_train_batches=BATCHES,
                        val_check_interval=CHECK_EVERY, num_sanity_val_steps=2, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard])
    trainer.fit(model, dm)
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    return trainer, metrics


def test_collapsing_run_is_diagnosed_and_stopped(tmp_path, tiny_tokenizer, synthetic_csv, one_thread, caplog):
    guard = PriorGuard(patience=2, min_gain=0.01, action="stop", grad_norm_every=5)
    with caplog.at_level(logging.WARNING, logger="pref_lightning.train.prior_guard"), \
            pytest.warns(PriorCollapseWarning) as caught:
        trainer, metrics = fit(tmp_path, tiny_tokenizer, synthetic_csv, guard, use_text_stats=False,
                               shuffle_labels=True)
    assert guard.triggered and len([w for w in caught if w.category is PriorCollapseWarning]) == 1
    # two checks (the sanity check does not count), then stopped: 12 of 48 steps
    assert trainer.global_step == 2 * CHECK_EVERY < EPOCHS * BATCHES
    gains = metrics["val/gain_over_prior"].dropna()
    assert len(gains) == 2 and (gains < 0.01).all()
    text = guard.last_diagnosis
    assert "class prior" in text and f"step {2 * CHECK_EVERY}" in text
    histogram = HISTOGRAM.search(text).group(0)
    assert histogram == " / ".join(f"{k} {v}" for k, v in zip(("A", "B", "tie"), guard.last_stats["pred_histogram"]))
    assert sum(guard.last_stats["pred_histogram"]) == guard.last_stats["rows"] == 40  # every validation row
    assert guard.last_stats["prior_log_loss"] == pytest.approx(trainer.lightning_module.reference["prior_log_loss"])
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}  # in force when it stopped
    assert f"head {lrs['head']:.2e} (initial 1.00e-02)" in text
    assert f"backbone top (backbone_d1) {lrs['backbone_d1']:.2e} (initial 1.00e-03)" in text
    assert guard.grad_norm_step == 10 and guard.grad_norms["head"] > 0 and guard.grad_norms["backbone"] > 0
    assert any(r.getMessage() == text for r in caplog.records)


def test_learning_run_is_not_flagged(tmp_path, tiny_tokenizer, synthetic_csv, one_thread):
    guard = PriorGuard(patience=2, min_gain=0.01, action="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PriorCollapseWarning)
        trainer, metrics = fit(tmp_path, tiny_tokenizer, synthetic_csv, guard, use_text_stats=True,
                               shuffle_labels=False)
    assert not guard.triggered and guard.last_diagnosis is None and guard.bad_checks == 0
    assert trainer.global_step == EPOCHS * BATCHES  # ran to the end
    gains = metrics["val/gain_over_prior"].dropna()
    assert len(gains) == EPOCHS * BATCHES // CHECK_EVERY and (gains > 0.01).all()
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["val/gain_over_prior"] > 0.05
    # the guard's own log loss (from the returned logits) matches the module's metric
    assert logged["val/gain_over_prior"] == pytest.approx(logged["val/prior_log_loss"] - logged["val/log_loss"],
                                                          abs=1e-5)
    assert metrics["val/pred_entropy"].dropna().between(0, math.log(3)).all()


# ---- DDP ---------------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    import lightning as L
    import torch
    import torch.nn.functional as F
    from pref_lightning.train.prior_guard import PriorCollapseWarning, PriorGuard

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
            self.train_prior, self.reference = [0.5, 0.3, 0.2], {}
        def forward(self, x):
            return self.head(torch.tanh(self.backbone(x)))
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["labels"])
        def validation_step(self, batch, batch_idx):
            return self(batch["x"])
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.backbone.parameters(), "name": "backbone_d0"},
                                    {"params": self.head.parameters(), "name": "head"}], lr=0.1)

    def rows(n, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, 4, generator=g), torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, True, generator=g)
        return [{"x": x[i], "labels": y[i]} for i in range(n)], y

    torch.set_num_threads(1)
    train, _ = rows(64, 0)
    val, val_labels = rows(48, 1)  # 24 rows per rank, no padding
    guard = PriorGuard(patience=2, min_gain=0.5, action="stop", grad_norm_every=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[guard])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Toy(), torch.utils.data.DataLoader(train, batch_size=8),
                    torch.utils.data.DataLoader(val, batch_size=8))
    out = {"rank": trainer.global_rank, "triggered": guard.triggered, "stats": guard.last_stats,
           "epoch": trainer.current_epoch, "step": trainer.global_step,
           "warned": sum(issubclass(w.category, PriorCollapseWarning) for w in caught),
           "logged_gain": float(trainer.callback_metrics["val/gain_over_prior"]),
           "expected_labels": torch.bincount(val_labels, minlength=3).tolist()}
    with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(out, f)
    # both files written before rank 0 exits; an undestroyed gloo group can abort the process at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_reduces_across_ranks_and_only_rank_zero_warns(tmp_path):
    script = tmp_path / "ddp_guard.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for out in ranks:
        stats = out["stats"]
        assert out["triggered"] and stats["rows"] == 48 == sum(stats["pred_histogram"])  # both halves summed
        assert stats["label_histogram"] == out["expected_labels"]
        assert out["step"] == 2 * 4 and out["epoch"] == 2  # stopped after the 2nd epoch's check, on both ranks
    assert ranks[0]["stats"] == ranks[1]["stats"] and ranks[0]["logged_gain"] == ranks[1]["logged_gain"]
    assert [out["warned"] for out in ranks] == [1, 0]
    # the logging copy of the diagnosis (no handler configured: stderr) comes from rank zero alone
    assert (result.stdout + result.stderr).count("PriorGuard: the model is stuck") == 1


def test_binary_module_is_judged_over_two_classes(caplog):
    guard = PriorGuard(patience=1, min_gain=0.01, action="warn")
    trainer, module = fake_trainer(), FakeModule((0.6, 0.4))
    module.hparams = {"n_classes": 2}  # what PreferenceModule(n_classes=2) saves
    labels = torch.tensor([0] * 60 + [1] * 40)
    with pytest.warns(PriorCollapseWarning, match="stuck at the class prior"):
        run_validation(guard, trainer, module, torch.tensor([0.6, 0.4]).log().expand(100, 2).clone(), labels)
    stats = guard.last_stats
    assert stats["label_histogram"] == [60, 40] and stats["pred_histogram"] == [100, 0]
    assert stats["prior_log_loss"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert "A 100 / B 0" in guard.last_diagnosis and "tie" not in guard.last_diagnosis.split("\n")[3]
