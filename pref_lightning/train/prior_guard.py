"""`PriorGuard`: makes a model that stays at the class prior loud.

DeBERTa fine-tuned on preference data often never leaves the class prior: validation log loss sits
at ~1.07-1.10 (the log loss of predicting the training class frequencies) and the argmax is the
majority class for every row. Nothing crashes, so such runs go unnoticed for hours. The guard
compares each validation check with the prior and, after `patience` checks in a row without a real
gain, prints one diagnosis (what the model predicts, LRs, gradient norms, what to try) and, with
``action="stop"``, ends the fit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from pref_lightning.core.distributed import settle_logged_metrics
from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import CLASS_LABELS, EPS, competition_log_loss, gain_over

log = logging.getLogger(__name__)

ACTIONS = ("warn", "stop")
N_CLASSES = len(CLASS_LABELS)  # binary tasks (module hparam n_classes=2) use the first two
# layout of the per-validation accumulator (one float64 vector, summed across ranks in one call)
_N, _NLL, _ENTROPY = 0, 1, 2


def _layout(k: int) -> tuple[slice, slice, slice, int]:
    """Slices of the mean probabilities, the argmax histogram and the label histogram; the size."""
    return slice(3, 3 + k), slice(3 + k, 3 + 2 * k), slice(3 + 2 * k, 3 + 3 * k), 3 + 3 * k


def n_classes_of(pl_module: L.LightningModule) -> int:
    """The module's number of classes (`PreferenceModule.n_classes`, from its encoding spec)."""
    n_classes = getattr(pl_module, "n_classes", None)
    if n_classes is None:
        n_classes = (getattr(pl_module, "hparams", None) or {}).get("n_classes", N_CLASSES)
    return int(n_classes)


class PriorCollapseWarning(UserWarning):
    """The model has not learned more than the class prior for several validation checks."""


def entropy(probs: Sequence[float]) -> float:
    return float(-sum(p * math.log(p) for p in probs if p > 0))


def _fmt_classes(values: Sequence[float], fmt: str) -> str:
    return " / ".join(f"{name} {format(v, fmt)}" for name, v in zip(CLASS_LABELS, values))


class PriorGuard(L.Callback):
    """Warn (or stop) when validation log loss stays within `min_gain` nats of the class prior.

    Args:
        patience: validation checks in a row with a gain below `min_gain` before acting.
        min_gain: nats below the prior log loss that count as learning.
        entropy_tolerance: mean prediction entropy within this many nats of the prior's entropy is
            reported as "collapsed to the prior" (the model outputs the class frequencies).
        action: ``"warn"`` (diagnosis only) or ``"stop"`` (diagnosis, then ``trainer.should_stop``).
        grad_norm_every: measure head/backbone gradient norms every this many optimizer steps.

    Everything the guard judges by is computed from the logits ``validation_step`` returns and the
    batch ``labels`` (summed across ranks under DDP), so it does not depend on logged metric names.
    The prior comes from ``pl_module.train_prior`` (training class frequencies).
    """

    def __init__(self, patience: int = 2, min_gain: float = 0.01, entropy_tolerance: float = 0.05,
                 action: str = "warn", grad_norm_every: int = 25) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise UserError(f"callbacks.prior_guard.action={action!r}; choose from {', '.join(ACTIONS)}")
        if int(patience) < 1:
            raise UserError(f"callbacks.prior_guard.patience={patience!r} must be at least 1")
        if int(grad_norm_every) < 1:
            raise UserError(f"callbacks.prior_guard.grad_norm_every={grad_norm_every!r} must be at least 1")
        self.patience = int(patience)
        self.min_gain = float(min_gain)
        self.entropy_tolerance = float(entropy_tolerance)
        self.action = action
        self.grad_norm_every = int(grad_norm_every)

        self.bad_checks = 0  # consecutive validation checks with gain < min_gain
        self.triggered = False
        self.last_diagnosis: str | None = None
        self.last_stats: dict[str, Any] | None = None  # figures of the latest validation check
        self.grad_norms: dict[str, float] = {}  # latest "head" / "backbone" gradient L2 norms
        self.grad_norm_step: int | None = None  # optimizer step they were measured at
        self._acc: torch.Tensor | None = None

    # ---- prior --------------------------------------------------------------------------------
    @staticmethod
    def train_prior(pl_module: L.LightningModule) -> list[float] | None:
        """Training class frequencies from the module, normalised; None when the module has none."""
        prior = [float(p) for p in (getattr(pl_module, "train_prior", None) or [])]
        if len(prior) != n_classes_of(pl_module) or sum(prior) <= 0:
            return None
        total = sum(prior)
        return [p / total for p in prior]

    # ---- validation accumulation --------------------------------------------------------------
    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._acc = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        k = n_classes_of(pl_module)
        if not isinstance(logits, torch.Tensor) or labels is None or logits.ndim != 2 or logits.shape[1] != k:
            return
        valid = batch.get("valid")  # DDP padding rows: the module returns the real rows' logits only
        if valid is not None and len(labels) != len(logits):
            labels = labels[valid.to(labels.device)]
        if len(labels) != len(logits):
            return
        probs_at, hist_at, labels_at, size = _layout(k)
        with torch.no_grad():
            logits = logits.detach().double()
            labels = labels.detach().long().to(logits.device)
            # the probabilities validation reports (with the module's probability floor, if it has one)
            probs = pl_module.probabilities(logits).double() if hasattr(pl_module, "probabilities") \
                else logits.softmax(-1)
            row = torch.zeros(size, dtype=torch.float64, device=logits.device)
            row[_N] = len(labels)
            row[_NLL] = competition_log_loss(probs, labels) * len(labels)  # summed: reduced across ranks
            row[_ENTROPY] = -(probs * probs.clamp(EPS, 1 - EPS).log()).sum()
            row[probs_at] = probs.sum(0)
            row[hist_at] = torch.bincount(probs.argmax(-1), minlength=k).double()
            row[labels_at] = torch.bincount(labels, minlength=k).double()
        self._acc = row if self._acc is None else self._acc + row.to(self._acc.device)

    def _reduced(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        # every rank takes part in the reduction, also a rank that saw no batch; metric syncs still
        # pending on this rank first (rank 0's progress bar may have done them already: see distributed.py)
        settle_logged_metrics(trainer)
        size = _layout(n_classes_of(pl_module))[3]
        acc = self._acc if self._acc is not None else torch.zeros(size, dtype=torch.float64)
        acc = acc.to(pl_module.device).clone()
        return trainer.strategy.reduce(acc, reduce_op="sum").detach().cpu()

    def compute_stats(self, acc: torch.Tensor, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """Figures of one validation check from the (reduced) accumulator; None when it saw no rows."""
        n = float(acc[_N])
        if n <= 0:
            return None
        k = n_classes_of(pl_module)
        probs_at, hist_at, labels_at, _ = _layout(k)
        label_counts = acc[labels_at].tolist()
        prior = self.train_prior(pl_module)
        reference = getattr(pl_module, "reference", None) or {}
        if prior is not None:
            # the train prior scored on exactly the validation rows seen here: equal to
            # reference["prior_log_loss"] on the full split, and still comparable under limit_val_batches
            prior_source = "train split"
            prior_log_loss = -sum(c * math.log(max(p, EPS)) for c, p in zip(label_counts, prior)) / n
        else:
            prior, prior_source = [1.0 / k] * k, "uniform (module has no train_prior)"
            if "prior_log_loss" in reference:
                prior_log_loss = float(reference["prior_log_loss"])
            else:
                prior_log_loss = math.log(k)
        val_log_loss = float(acc[_NLL]) / n
        pred_entropy = float(acc[_ENTROPY]) / n
        prior_entropy = entropy(prior)
        return {
            "rows": int(round(n)),
            "val_log_loss": val_log_loss,
            "prior_log_loss": prior_log_loss,
            "gain": gain_over(prior_log_loss, val_log_loss),
            "pred_entropy": pred_entropy,
            "prior_entropy": prior_entropy,
            "collapsed": abs(pred_entropy - prior_entropy) <= self.entropy_tolerance,
            "pred_histogram": [int(round(c)) for c in acc[hist_at].tolist()],
            "mean_probs": [p / n for p in acc[probs_at].tolist()],
            "label_histogram": [int(round(c)) for c in label_counts],
            "prior": prior,
            "prior_source": prior_source,
        }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        stats = self.compute_stats(self._reduced(trainer, pl_module), pl_module)
        self._acc = None
        if stats is None:
            return
        self.last_stats = stats
        # identical on every rank (reduced above); sync_dist only silences Lightning's DDP advice
        pl_module.log("val/gain_over_prior", stats["gain"], sync_dist=True)
        pl_module.log("val/pred_entropy", stats["pred_entropy"], sync_dist=True)
        if trainer.state.fn != TrainerFn.FITTING:
            return  # trainer.validate(): report, but judge training only while it runs
        if stats["gain"] >= self.min_gain:
            self.bad_checks = 0
            return
        self.bad_checks += 1
        if self.bad_checks != self.patience:
            return  # one diagnosis per streak
        self.triggered = True
        self.last_diagnosis = self.diagnose(trainer, stats, getattr(pl_module, "hparams", None) or {})
        if trainer.is_global_zero:
            rank_zero_warn(self.last_diagnosis, category=PriorCollapseWarning)
            log.warning(self.last_diagnosis)
        if self.action == "stop":
            trainer.should_stop = True  # same decision on every rank: it rests on reduced figures

    # ---- optimisation state -------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step % self.grad_norm_every:
            return
        norms = {}
        for part in ("head", "backbone"):
            module = getattr(pl_module, part, None)
            if isinstance(module, torch.nn.Module):
                grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
                if grads:
                    norms[part] = float(torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
                else:
                    norms[part] = 0.0
        self.grad_norms = norms
        self.grad_norm_step = int(trainer.global_step)

    @staticmethod
    def learning_rates(trainer: L.Trainer) -> dict[str, tuple[float, float | None]]:
        """Learning rate in force (and the initial one) per named param group of the first optimizer."""
        if not trainer.optimizers:
            return {}
        out = {}
        for i, group in enumerate(trainer.optimizers[0].param_groups):
            out[str(group.get("name", f"group{i}"))] = (float(group["lr"]), group.get("initial_lr"))
        return out

    @staticmethod
    def _lr_summary(lrs: Mapping[str, tuple[float, float | None]]) -> str:
        def depth(name: str) -> int:
            try:
                return int(name.removeprefix("backbone_d").split("_")[0])
            except ValueError:
                return -1

        def show(name: str, label: str) -> str:
            lr, initial = lrs[name]
            text = f"{label} {lr:.2e}"
            if initial is not None and not math.isclose(lr, float(initial), rel_tol=1e-6):
                text += f" (initial {float(initial):.2e})"
            return text

        backbone = sorted((n for n in lrs if n.startswith("backbone_d")), key=lambda n: (depth(n), n))
        parts = []
        if "head" in lrs:
            parts.append(show("head", "head"))
        if backbone:
            decay = [n for n in backbone if not n.endswith("_no_decay")] or backbone
            top = max(decay, key=depth)
            parts.append(show(top, f"backbone top ({top})"))
            bottom = min(decay, key=depth)
            if bottom != top:
                parts.append(show(bottom, f"backbone bottom ({bottom})"))
        shown = {"head", *backbone}
        parts += [show(n, n) for n in lrs if n not in shown]
        return ", ".join(parts) if parts else "unknown (no optimizer)"

    # ---- diagnosis ----------------------------------------------------------------------------
    def diagnose(self, trainer: L.Trainer, stats: Mapping[str, Any],
                 hparams: Mapping[str, Any] | None = None) -> str:
        collapsed = (f"collapsed: it predicts the prior (within {self.entropy_tolerance:g} nats)" if stats["collapsed"]
                     else f"not collapsed by entropy (tolerance {self.entropy_tolerance:g} nats): confident but "
                          "no better than the prior")
        if self.grad_norms:
            grads = ", ".join(f"{k} {v:.3e}" for k, v in self.grad_norms.items())
            grads += f" (optimizer step {self.grad_norm_step}, measured every {self.grad_norm_every})"
        else:
            grads = "not measured yet"
        lines = [
            f"PriorGuard: the model is stuck at the class prior - {self.bad_checks} validation checks in a row "
            f"gained less than {self.min_gain:g} nats over predicting the training class frequencies "
            f"(epoch {trainer.current_epoch}, step {trainer.global_step}).",
            f"  val log loss {stats['val_log_loss']:.4f} vs prior log loss {stats['prior_log_loss']:.4f}: "
            f"gain {stats['gain']:+.4f} nats (needs >= {self.min_gain:g}), {stats['rows']} validation rows",
            f"  prediction entropy {stats['pred_entropy']:.4f} vs prior entropy {stats['prior_entropy']:.4f} nats: "
            f"{collapsed}",
            f"  predicted classes (argmax): {_fmt_classes(stats['pred_histogram'], 'd')}"
            f"  (validation labels: {_fmt_classes(stats['label_histogram'], 'd')})",
            f"  mean predicted probabilities: {_fmt_classes(stats['mean_probs'], '.3f')} vs prior "
            f"({stats['prior_source']}): {_fmt_classes(stats['prior'], '.3f')}",
            f"  learning rate in force: {self._lr_summary(self.learning_rates(trainer))}",
            f"  latest gradient norms: {grads}",
            "  try:",
            *(f"   - {tip}" for tip in advice(trainer, hparams or {})),
        ]
        if self.action == "warn":
            lines.append("  (to end such runs automatically: callbacks.prior_guard.action=stop)")
        else:
            lines.append("  stopping training (callbacks.prior_guard.action=stop)")
        return "\n".join(lines)

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"bad_checks": self.bad_checks, "triggered": self.triggered, "last_diagnosis": self.last_diagnosis}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_checks = int(state_dict.get("bad_checks", 0))
        self.triggered = bool(state_dict.get("triggered", False))
        self.last_diagnosis = state_dict.get("last_diagnosis")


def advice(trainer: Any, hparams: Mapping[str, Any]) -> list[str]:
    """What to try against a model stuck at the prior: only changes from the settings in force."""
    tips = [
        "lower the backbone LR (model.lr, e.g. 1e-5..2e-5 for DeBERTa) and/or raise the head LR (model.head_lr)",
        "check the warmup (model.warmup_ratio): too short a warmup at a high LR knocks the backbone over; "
        "a run still in warmup may just need more steps",
    ]
    precision = str(getattr(trainer, "precision", ""))
    if precision in ("16", "16-mixed", "16-true"):
        tips.append(f"use bf16 mixed precision, not fp16 (trainer.precision=bf16-mixed; now {precision}): "
                    "fp16 overflows in DeBERTa")
    # backbone_dropout None keeps the backbone config's own dropout (0.1 for DeBERTa)
    dropout = {k: hparams[k] for k in ("backbone_dropout", "head_dropout")
               if k in hparams and (hparams[k] is None or float(hparams[k]) > 0)}
    if dropout:
        tips.append("turn dropout off (" + ", ".join(f"model.{k}=0.0" for k in dropout) + ")")
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "train_path", "") is None:  # synthetic rows
        tips.append("real data (experiment=full_data data.train_path=train.csv)")
    elif datamodule is not None:
        tips.append("more data (extra training files: data.sources=[...])")
    max_epochs = getattr(trainer, "max_epochs", None)
    tips.append("more epochs (trainer.max_epochs" + (f", now {max_epochs})" if max_epochs else ")"))
    return tips

