"""Training callbacks: progress (Rich bar or log lines), the SIGTERM checkpoint and exit, and
`StageProbe` (per-stage timing and placement). `PriorGuard` lives in `prior_guard.py`."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pref_lightning.core.cli import say
from pref_lightning.core.errors import UserError

log = logging.getLogger(__name__)
PROGRESS_STYLES = ("auto", "rich", "log")


def drop_progress_bars(callbacks: Sequence[Any], enabled: bool) -> list[Any]:
    """The callbacks without progress bars when `trainer.enable_progress_bar` is false: Lightning raises
    a MisconfigurationException for a progress-bar callback (the default Rich bar) with the bar disabled."""
    return list(callbacks) if enabled else [c for c in callbacks if not isinstance(c, ProgressBar)]


def progress_bar(leave: bool = True, log_every_s: float = 30.0, style: str = "auto") -> ProgressBar:
    """Lightning's Rich bar on a terminal or in a notebook; with stdout redirected (a log file, CI, a
    cluster job) a bar draws nothing useful, so `LogProgress` writes a line every `log_every_s` seconds
    instead. `style` rich / log forces one."""
    if style not in PROGRESS_STYLES:
        raise UserError(f"callbacks.rich_progress_bar.style={style!r}; choose from {', '.join(PROGRESS_STYLES)}")
    if style == "rich" or (style == "auto" and (sys.stdout.isatty() or "ipykernel" in sys.modules)):
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(leave=leave)
    return LogProgress(every_s=log_every_s)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s") if seconds >= 60 \
        else f"{seconds}s"


class LogProgress(ProgressBar):
    """Progress as log lines (stage, batch/total, rows/s over all ranks, ETA), at most one per `every_s`
    seconds and at the end of each stage; rank 0 logs, and no hook issues a collective."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = float(every_s)
        self._enabled = True
        self._stages: dict[str, dict[str, Any]] = {}

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _start(self, stage: str, total: float) -> None:
        now = time.monotonic()
        self._stages[stage] = {"total": total, "done": 0, "rows": 0, "start": now, "last": now}

    def _step(self, trainer: L.Trainer, stage: str, batch: Any, final: bool = False) -> None:
        state = self._stages.get(stage)
        if state is None or trainer.sanity_checking:
            return
        if not final:
            state["done"] += 1
            index = batch.get("index") if isinstance(batch, Mapping) else None
            state["rows"] += len(index) if index is not None else 0
        now = time.monotonic()
        if not (self._enabled and trainer.is_global_zero) or (not final and now - state["last"] < self.every_s):
            return
        state["last"] = now
        elapsed = max(now - state["start"], 1e-9)
        rows_per_s = state["rows"] * trainer.world_size / elapsed
        total = state["total"]
        if final:
            log.info("%s: %d batches in %s, %.0f rows/s", stage, state["done"], _duration(elapsed), rows_per_s)
        elif total and math.isfinite(total):
            eta = (total - state["done"]) * elapsed / max(state["done"], 1)
            log.info("%s: batch %d/%d (%d%%), %.0f rows/s, ETA %s", stage, state["done"], total,
                     100 * state["done"] // total, rows_per_s, _duration(eta))
        else:
            log.info("%s: batch %d, %.0f rows/s", stage, state["done"], rows_per_s)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(f"epoch {trainer.current_epoch}", self.total_train_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step(trainer, f"epoch {trainer.current_epoch}", batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step(trainer, f"epoch {trainer.current_epoch}", None, final=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start("validation", sum(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(trainer, "validation", batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step(trainer, "validation", None, final=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("prediction", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(trainer, "prediction", batch)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step(trainer, "prediction", None, final=True)


class SigtermCheckpoint(L.Callback):
    """On SIGTERM (a cluster's pre-emption or time limit, `kill`), save a resumable `last.ckpt` and stop.

    Lightning turns SIGTERM into an exception at the end of the current training batch (on every DDP
    rank); this saves the full training state there, next to the ModelCheckpoint's files, so
    `python train.py ckpt_path=last hydra.run.dir=RUN` continues from the next batch.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved_path: str | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None) or f"{trainer.default_root_dir}/checkpoints"
        self.saved_path = f"{folder}/{self.filename}"
        if not trainer.is_global_zero:
            return
        # rank 0 alone, without `trainer.save_checkpoint`'s barrier: under DDP the ranks reach this point
        # out of step (Lightning forwards the signal and broadcasts it inside its handler), and a
        # collective here would hang. The DDP replicas are identical, so rank 0's state is the state.
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.checkpoint_io.save_checkpoint(state, self.saved_path)
        log.warning("SIGTERM at epoch %d, step %d: saved %s to resume from", trainer.current_epoch,
                    trainer.global_step, self.saved_path)


def exit_after_sigterm(trainer: L.Trainer, run_dir: Path) -> NoReturn:
    """End a run that SIGTERM stopped with status 143, after saying how to resume it.

    Lightning's `SIGTERMException` would exit with status 0; a scheduler must see that the job did not
    finish. Ranks this process launched may be blocked in a collective with it: they are ended, as
    Lightning does on Ctrl+C (the checkpoint is saved; their replicas hold nothing more).
    """
    saved = next((c.saved_path for c in trainer.callbacks if isinstance(c, SigtermCheckpoint)), None)
    if trainer.is_global_zero:
        say(f"SIGTERM: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}"
              + (f"; resume with: python train.py ckpt_path=last hydra.run.dir={run_dir}" if saved else ""))
    launcher = trainer.strategy.launcher
    if launcher is not None and hasattr(launcher, "procs"):
        launcher.kill(signal.SIGKILL)
    raise SystemExit(143) from None


class RelocatableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose record of the best model survives a moved or copied run folder.

    `last.ckpt` stores the callback's absolute `dirpath`; Lightning restores `best_model_score`, `best_k_models`
    and `kth_value` only when the new `dirpath` is the same string (Lightning #12045, #15705), so after a
    resume elsewhere the first validation became "best" and replaced a better `best.ckpt`, and
    `best_model_path` kept pointing into the old folder. Here every path under the saved `dirpath` is moved
    under the current one before Lightning restores them; when the moved `best_model_path` is not there
    (only `last.ckpt` was copied) the record is dropped, as Lightning does. The state is stored under
    ModelCheckpoint's own key, so `last.ckpt` files of either class resume into the other."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved and here and saved != here:
            state_dict = relocated_state(state_dict, str(saved), str(here))
            if self.monitor and state_dict.get("dirpath") == here:
                log.warning("resumed in a moved run folder (checkpoints were in %s): %s (%s %s) is kept unless a "
                            "later validation beats it", saved, state_dict.get("best_model_path"), self.monitor,
                            _score(state_dict.get("best_model_score")))
        super().load_state_dict(state_dict)


def _score(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "-"


def relocated_state(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """ModelCheckpoint's saved `state` with every path under folder `old` moved under `new` (strings, as
    Lightning stores them), `dirpath` set to `new`; unchanged (so Lightning drops the record) when the moved
    `best_model_path` is not a file."""

    prefix = old.rstrip(os.sep) + os.sep

    def move(path: Any) -> Any:
        if isinstance(path, str) and path.startswith(prefix):
            return os.path.join(new, path[len(prefix):])
        return path

    moved = dict(state)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in moved:
            moved[key] = move(moved[key])
    if isinstance(moved.get("best_k_models"), dict):
        moved["best_k_models"] = {move(k): v for k, v in moved["best_k_models"].items()}
    if moved.get("best_model_path") and not Path(moved["best_model_path"]).is_file():
        return state
    moved["dirpath"] = new
    return moved


class ScheduleGuard(L.Callback):
    """The LR schedule is sized from `trainer.estimated_stepping_batches` when the optimizers are configured;
    a run resumed with a larger `trainer.max_epochs` (or `max_steps`) would rebuild it for the new length at
    the current step, so the LR jumped (~28x) with no warmup and no word (Lightning #2823). This records
    the planned optimizer steps in `last.ckpt` and, on a resume that plans another number, keeps the
    original schedule (its warmup and decay unchanged; steps past its end run at its final LR), said in one
    warning line."""

    def __init__(self) -> None:
        self.planned_steps: int | None = None  # of the run that began; restored from last.ckpt on resume
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"planned_steps": self.planned_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned_steps = state_dict.get("planned_steps")
        self.restored = self.planned_steps is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        planned = int(trainer.estimated_stepping_batches)
        if not self.restored or self.planned_steps is None:
            self.planned_steps = planned
            return
        original = int(self.planned_steps)
        if planned == original:
            return
        kept = keep_schedule_length(trainer, pl_module, original)
        if trainer.is_global_zero:
            final = f"{pl_module.hparams.min_lr_ratio:g} x model.lr" if kept else ""
            log.warning(
                "resumed with %d optimizer steps planned (trainer.max_epochs=%s) where the run began with %d: %s",
                planned, trainer.max_epochs, original,
                f"the LR schedule continues over the original {original} steps (warmup and decay unchanged); "
                f"steps past them run at its final LR ({final}); start a fresh run for a schedule over {planned}"
                if kept else "the LR schedule is rebuilt for the new length from the current step (the LR may jump)")


def keep_schedule_length(trainer: L.Trainer, pl_module: L.LightningModule, total_steps: int) -> bool:
    """Point the module's warmup/decay LambdaLR at `total_steps` instead of the new estimate; False when the
    schedulers are not those `PreferenceModule.configure_optimizers` builds (optim.py; nothing changed)."""
    import functools

    from pref_lightning.model.optim import warmup_decay

    hp = pl_module.hparams
    configs = trainer.lr_scheduler_configs
    if not configs or not all(k in hp for k in ("warmup_ratio", "schedule", "min_lr_ratio")):
        return False
    for config in configs:
        if not isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR):
            return False
    multiplier = functools.partial(warmup_decay, warmup_steps=int(hp.warmup_ratio * total_steps),
                                   total_steps=total_steps, schedule=hp.schedule, min_ratio=hp.min_lr_ratio)
    for config in configs:
        config.scheduler.lr_lambdas = [multiplier] * len(config.scheduler.lr_lambdas)
    return True


class StageProbe(L.Callback):
    """Per-stage timing and placement, for hardware checks (`benchmarks/gpu_check.py`).

    For each stage (fit, validate, predict) it records wall seconds, real (attention-mask) tokens per
    second, peak accelerator memory (GiB, CUDA only), the device the module ran on and the number of
    non-finite training losses, and appends them to `path` (JSON lines; rank 0 only). With
    `require_device` set (e.g. "cuda"), a batch run anywhere else raises `RuntimeError` at once: the
    check that no stage silently falls back to the CPU.
    """

    def __init__(self, path: str, require_device: str | None = None) -> None:
        self.path = Path(path)
        self.require_device = require_device
        self._stage: dict[str, Any] = {}

    def _start(self, trainer: L.Trainer, stage: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._stage = {"stage": stage, "started": time.perf_counter(), "tokens": 0, "rows": 0, "batches": 0,
                       "non_finite_losses": 0, "devices": set(), "precision": str(trainer.precision),
                       "world_size": trainer.world_size}

    def _batch(self, pl_module: L.LightningModule, batch: Mapping[str, torch.Tensor]) -> None:
        device = pl_module.device.type
        if self.require_device and device != self.require_device:
            raise RuntimeError(f"StageProbe: the {self._stage.get('stage')} stage ran a batch on {device}, "
                               f"not {self.require_device}")
        self._stage["devices"].add(device)
        self._stage["rows"] += int(batch["labels"].numel())
        self._stage["batches"] += 1

    def _count_tokens(self, pl_module: L.LightningModule) -> None:
        # the real tokens the backbone read: a cross-layout batch also holds the exchanged rows, which only
        # swap TTA runs
        if self._stage:
            self._stage["tokens"] += int(getattr(pl_module, "last_real_tokens", 0))

    def _end(self, trainer: L.Trainer) -> None:
        if not self._stage:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stage, self._stage = self._stage, {}
        seconds = time.perf_counter() - stage.pop("started")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        record = {**stage, "devices": sorted(stage["devices"]), "seconds": round(seconds, 2),
                  "tokens_per_s": round(stage["tokens"] * trainer.world_size / max(seconds, 1e-9), 1),
                  "peak_memory_gib": None if peak is None else round(peak, 3)}
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._start(trainer, "fit")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch(pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._count_tokens(pl_module)
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            self._stage["non_finite_losses"] += 1

    def on_train_end(self, trainer, pl_module):
        self._end(trainer)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn != TrainerFn.FITTING:  # validation inside fit is part of the fit stage
            self._start(trainer, "validate")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn != TrainerFn.FITTING:
            self._batch(pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn != TrainerFn.FITTING:
            self._count_tokens(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != TrainerFn.FITTING:
            self._end(trainer)

    def on_predict_start(self, trainer, pl_module):
        self._start(trainer, "predict")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch(pl_module, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._count_tokens(pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._end(trainer)
