"""The training recipe: config -> records -> tokenizer -> tokenized pairs -> model -> fit -> one
validation pass of the best checkpoint -> calibration -> metrics.json, oof.csv, report.md."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from pref_lightning.core.atomic import atomic_write_text
from pref_lightning.core.cli import say
from pref_lightning.core.distributed import all_ranks, hydra_job_processes
from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import competition_log_loss, gain_over
from pref_lightning.core.runtime import instantiate_list, set_runtime_defaults
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.records import FLOAT_FORMAT
from pref_lightning.data.submission import submission_frame
from pref_lightning.data.tokenizers import tokenizer_files
from pref_lightning.model.anchor import anchor_log_loss, fit_anchor_on
from pref_lightning.model.backbone import build_tokenizer
from pref_lightning.model.checkpoint import store_in_payload, store_temperature
from pref_lightning.model.compat import check_backbone_settings, check_hardware
from pref_lightning.model.evaluation import EvaluationPolicy
from pref_lightning.model.module import PreferenceModule
from pref_lightning.model.network import PreferenceNetwork
from pref_lightning.model.stages import (
    apply_init,
    read_init,
    read_text_scorer,
    same_vocabulary,
    score_columns,
)
from pref_lightning.train.calibration import TEMPERATURE_RANGE, fit_temperature
from pref_lightning.train.callbacks import drop_progress_bars, exit_after_sigterm
from pref_lightning.train.report import csv_metrics_path, write_report
from pref_lightning.train.resume import RunIdentity, output_dir, resume_checkpoint, run_identity
from pref_lightning.train.stages import ensure_stage, teacher_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate the best checkpoint, write `metrics.json`; return the metrics."""
    with hydra_job_processes():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    hardware = check_hardware(cfg)
    set_runtime_defaults()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)
    # an earlier stage this recipe starts from (model.init_from / text_anchor name its checkpoint): trained
    # first when missing
    ensure_stage(cfg.get("stage1"), str(cfg.paths.data_dir), int(cfg.seed))
    use_teacher_files(cfg, run_dir)  # a source whose teacher is a checkpoint: its predictions on the source

    tokenizer = check_backbone_settings(cfg)  # settings that contradict the backbone: refused before any data is read
    datamodule: PreferenceDataModule = instantiate(cfg.data)
    data = datamodule.load_records()  # the split records (read once)
    tokenizer = tokenizer or build_tokenizer(cfg.model, data.tokenizer_texts)
    callbacks = drop_progress_bars(instantiate_list(cfg.get("callbacks")), cfg.trainer.get("enable_progress_bar", True))
    callbacks.append(RunIdentity(run_identity(cfg)))  # in last.ckpt: ckpt_path resumes it only into this config
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks,
                                     logger=instantiate_list(cfg.get("logger")) or False, **hardware)
    # tokenizes once and fits the statistics' normalisation: datamodule.spec is complete from here (it raises
    # before), so the anchor fit, the validation references and the model all read the fitted spec
    datamodule.fit_spec(tokenizer)
    model = build_model(cfg, datamodule, tokenizer, run_dir / "tokenizer" if trainer.is_global_zero else None)
    record_init(model)  # the weights training starts from (lora average checks it)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg))
    except SIGTERMException:
        exit_after_sigterm(trainer, run_dir)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results, val_logits, val_labels = validate_best(trainer, model, datamodule, best)
    fallback = None
    if cfg.model.get("anchor_fallback", False):
        fallback, results, val_logits, val_labels = fall_back_to_baseline(trainer, model, datamodule, best, results,
                                                                          val_logits, val_labels)
    calibration = calibrate(model, val_logits, val_labels, best if trainer.is_global_zero else None,
                            enabled=bool(cfg.get("calibrate", True)))
    metrics = run_metrics(results, calibration, model, datamodule, trainer, cfg, best, started)
    if fallback is not None:
        metrics["anchor_fallback"] = fallback
        metrics["warnings"].append(
            f"the trained model ended behind the statistics baseline it started from (validation log loss "
            f"{fallback['trained_log_loss']:.4f} > {fallback['baseline_log_loss']:.4f}): the checkpoint holds the "
            "baseline alone (model.anchor_fallback=false keeps the trained model)")
    if trainer.is_global_zero:
        write_outputs(run_dir, cfg, metrics, model, datamodule, trainer, val_logits, val_labels)
    return metrics


def use_teacher_files(cfg: DictConfig, run_dir: Path) -> None:
    """`cfg.data.sources` with every teacher that names a checkpoint or run folder replaced, in place, by the
    file of its uncalibrated predictions on that source (`train.stages.teacher_files`)."""
    sources = cfg.data.get("sources")
    if not sources:
        return
    raw = OmegaConf.to_container(sources, resolve=True)
    resolved = teacher_files(list(raw), run_dir)
    if resolved != raw:
        with open_dict(cfg):
            cfg.data.sources = resolved


def build_model(cfg: DictConfig, datamodule: PreferenceDataModule, tokenizer: Any,
                tokenizer_folder: Path | None) -> PreferenceModule:
    """The model of `cfg.model` (`hydra.utils.instantiate`), given every data fact through its constructor:
    the encoding spec, the training split's class prior, the validation references (with the anchored head,
    the baseline it starts from), the tokenizer's files (also saved to `tokenizer_folder` when given) and,
    with `model.anchor_head`, the statistics' regression fitted on the training split (`model.anchor_l2`,
    `model.anchor_rows`). With `model.init_from` the network starts from that checkpoint (stages.py,
    recorded as `lineage`); with `model.text_anchor` that checkpoint's frozen network scores every pair and
    its score joins the regression."""
    settings = cfg.model
    files = tokenizer_files(tokenizer, tokenizer_folder)
    init_path, text_path = settings.get("init_from"), settings.get("text_anchor")
    init = read_init(init_path) if init_path else None
    text_anchor, scorer, side_columns = None, None, None
    if text_path:
        text_anchor, weights, scorer_files = read_text_scorer(text_path, datamodule.spec.layout)
        if not same_vocabulary(scorer_files, tokenizer):
            raise UserError(f"model.text_anchor={text_path}: that checkpoint's tokenizer is not this run's "
                            "(another backbone or vocabulary); train the text anchor with the same model.backbone")
        scorer = PreferenceNetwork.from_hparams(text_anchor["hparams"], text_anchor["backbone_config"])
        scorer.load_state_dict(weights)
        scorer.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        device = next(scorer.parameters()).device

        def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return scorer({k: batch[k].to(device) for k in ("input_ids", "attention_mask")}, tta_swap=True)

        def side_columns(pairs):
            return score_columns(score, pairs, datamodule.collator(), datamodule.eval_batch_size)
    anchor = None
    if settings.get("anchor_head"):
        anchor = fit_anchor_on(datamodule, l2=settings.get("anchor_l2"), rows=settings.get("anchor_rows", "train_file"),
                               side_columns=side_columns)
    reference = datamodule.validation_reference()
    if anchor is not None:  # the anchored model's step-0 validation loss: what training must beat
        val_a, val_b, val_labels = datamodule.split_statistics("val")
        if side_columns is not None:
            text_a, text_b = side_columns(datamodule.val_set.pairs)
            val_a, val_b = np.concatenate([val_a, text_a], 1), np.concatenate([val_b, text_b], 1)
        policy = EvaluationPolicy()  # the model's defaults where the config leaves a key out
        reference["baseline_log_loss"] = anchor_log_loss(
            anchor, val_a, val_b, val_labels, bool(settings.get("tta_swap", policy.tta_swap)),
            float(settings.get("prob_floor", policy.prob_floor)))
    # _partial_: the data facts join as plain Python objects (a merge into the config would turn the spec,
    # a dataclass, into a config node)
    build = instantiate(settings, _partial_=True, _convert_="all")
    model = build(vocab_size=len(tokenizer), spec=datamodule.spec, anchor=anchor,
                  train_prior=datamodule.train_prior.tolist(), reference=reference, tokenizer_files=files,
                  augment_seed=int(cfg.seed), lineage=init["lineage"] if init else [], text_anchor=text_anchor)
    if scorer is not None:
        model.text_scorer.load_state_dict(scorer.cpu().state_dict())
    if init is not None:
        model.init_info = apply_init(model, init)
        if model.anchor is not None:  # the head's output starts at zero again: step 0 is the anchor
            model.reset_to_baseline()
    return model


def fall_back_to_baseline(trainer: L.Trainer, model: PreferenceModule, datamodule: PreferenceDataModule, best: str,
                          results: dict[str, float], logits: torch.Tensor, labels: torch.Tensor):
    """The anchored model that ended behind its step-0 baseline on validation goes back to that baseline:
    `reset_to_baseline` (head output at zero, the anchor at its fitted regression), so its logits are the
    statistics regression's alone, and the best checkpoint is rewritten with them. Early stopping whose candidates include step 0:
    the model kept never scores worse on validation than the baseline it started from (a choice between
    two models on the validation rows, as the checkpoint choice itself is). Returns (what happened or None,
    results, logits, labels) of the model kept."""
    baseline = model.reference.get("baseline_log_loss")
    if model.anchor is None or baseline is None or results["val/log_loss"] <= baseline + 1e-4:
        return None, results, logits, labels
    trained = float(results["val/log_loss"])
    model.reset_to_baseline()
    if best:
        trainer.save_checkpoint(best, weights_only=True)
    results, logits, labels = validate_best(trainer, model, datamodule, None)
    log.warning("anchored head: the trained model (validation log loss %.4f) ended behind its baseline (%.4f); "
                "the checkpoint now holds the baseline alone (%.4f)", trained, baseline, results["val/log_loss"])
    return {"trained_log_loss": trained, "baseline_log_loss": float(baseline)}, results, logits, labels


def validate_best(trainer: L.Trainer, model: PreferenceModule, datamodule: PreferenceDataModule,
                  best: str | None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Validate the best checkpoint (`best`; None: the weights in memory) in Lightning's own loop, on the
    run's accelerator and precision: its metrics, and the uncalibrated logits and labels of every
    validation row (gathered from all DDP ranks, in validation-set order) that the same loop computed.
    Every row: `trainer.limit_val_batches` (a quick check during fitting) does not apply to this pass."""
    trainer.limit_val_batches = 1.0
    results = trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    logits, labels, index = all_ranks(*model.validation_outputs())
    if sorted(index.tolist()) != list(range(len(datamodule.val_set))):
        raise RuntimeError(f"validation covered {len(index)} rows unevenly ({len(datamodule.val_set)} expected)")
    order = torch.argsort(index)
    return results, logits[order], labels[order]


def calibrate(model: PreferenceModule, logits: torch.Tensor, labels: torch.Tensor, checkpoint: str | None,
              enabled: bool = True) -> dict[str, Any]:
    """Fit a temperature (within `TEMPERATURE_RANGE`) on the validation `logits` of `model` (the best
    weights) and store it in `checkpoint` (rank 0 passes the path, other ranks None). Returns the log loss
    before and after, both with the model's probability floor, as validation and prediction compute them."""
    before = float(competition_log_loss(model.probabilities(logits), labels))
    if not enabled:
        return {"val_log_loss_uncalibrated": before}
    temperature = fit_temperature(logits, labels, floor=model.evaluation.prob_floor)
    model.set_evaluation(temperature=temperature)
    after = float(competition_log_loss(model.probabilities(logits, calibrated=True), labels))
    if checkpoint:
        store_temperature(checkpoint, temperature)
    return {"temperature": temperature, "val_log_loss_uncalibrated": before, "val_log_loss_calibrated": after,
            "temperature_at_bound": temperature in TEMPERATURE_RANGE}


def run_metrics(results: dict[str, float], calibration: dict[str, Any], model: PreferenceModule,
                datamodule: PreferenceDataModule, trainer: L.Trainer, cfg: DictConfig, best: str,
                started: float) -> dict[str, Any]:
    """What `metrics.json` holds: the validation scores, the references and the gains over each."""
    from pref_lightning.core.runinfo import run_info

    metrics = {
        "val_log_loss": float(results["val/log_loss"]),
        "val_accuracy": float(results["val/accuracy"]),
        **calibration,
        **model.reference,
        "train_rows": len(datamodule.train_records),
        "val_rows": len(datamodule.val_records),
        "data": datamodule.source_name,
        "n_classes": datamodule.spec.n_classes,
        "data_counts": datamodule.data_counts,  # rows read / skipped / deduplicated per file
        "backbone": cfg.model.backbone,
        "lineage": list(model.hparams.get("lineage") or []),  # the checkpoints this run started from
        "init_from": getattr(model, "init_info", None),
        "text_anchor": (model.hparams.get("text_anchor") or {}).get("source"),
        "epochs": trainer.current_epoch,
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        # the precision actually run (after check_hardware), versions, commit, machine, what to run next
        "run_info": run_info(str(trainer.precision), predict_command=predict_command(best)),
    }
    for reference in ("prior", "uniform", "val_prior", "baseline"):  # gains over each reference present
        if f"{reference}_log_loss" in metrics:
            metrics[f"gain_over_{reference}"] = gain_over(metrics[f"{reference}_log_loss"], metrics["val_log_loss"])
    metrics["warnings"] = health_warnings(metrics)
    if datamodule.n_folds:
        metrics.update(n_folds=datamodule.n_folds, fold=datamodule.fold)
    return metrics


def record_init(model: PreferenceModule) -> None:
    """`model.init_fingerprint`: the hash of the adapter and head weights training starts from, written into
    best.ckpt by `write_outputs` (`python -m pref_lightning.model.merge average` refuses checkpoints of other inits)."""
    from pref_lightning.model.lora import init_fingerprint

    model.init_fingerprint = init_fingerprint(model)


def predict_command(best: str) -> str | None:
    """The `predict.py` command to run next on the best checkpoint (None without one)."""
    if not best:
        return None
    return f"python predict.py ckpt_path={Path(best).resolve()} input_path=test.csv output_path=submission.csv"


def health_warnings(metrics: dict[str, Any]) -> list[str]:
    """What validation says is wrong with the model, in words: worse than uniform or than the validation
    rows' own class prior (then calibration flattens it towards uniform), or a temperature at its bound."""
    warnings = []
    loss, uniform, val_prior = metrics["val_log_loss"], metrics["uniform_log_loss"], metrics["val_prior_log_loss"]
    if loss > uniform:
        warnings.append(f"the model is worse than uniform on validation: log loss {loss:.4f} > ln {metrics['n_classes']}"
                        f" = {uniform:.4f}; its predictions are harmful, not merely uninformative")
    elif loss > val_prior:
        warnings.append(f"the model is worse than the validation rows' own class prior: log loss {loss:.4f} > "
                        f"{val_prior:.4f}")
    if "baseline_log_loss" in metrics and loss > metrics["baseline_log_loss"] + 1e-4:
        warnings.append(f"the model ended behind the statistics baseline it started from: log loss {loss:.4f} > "
                        f"{metrics['baseline_log_loss']:.4f}; its training added nothing the text gives")
    if metrics.get("temperature_at_bound"):
        warnings.append(f"the calibration temperature hit its bound ({metrics['temperature']:g}, range "
                        f"{TEMPERATURE_RANGE}): calibration cannot repair this model"
                        + ("; it is flattened towards uniform" if metrics["temperature"] > 1 else ""))
    return warnings


def write_outputs(run_dir: Path, cfg: DictConfig, metrics: dict[str, Any], model: PreferenceModule,
                  datamodule: PreferenceDataModule, trainer: L.Trainer, val_logits: torch.Tensor,
                  val_labels: torch.Tensor) -> None:
    """Rank 0: metrics.json, the fold files (k-fold runs), report.md, and a summary on stdout."""
    val_probs = model.probabilities(val_logits, calibrated=True).numpy()  # what predict.py would output
    if metrics.get("best_checkpoint"):  # predict.py runs in the precision training used unless told otherwise
        store_in_payload(metrics["best_checkpoint"], precision=metrics["run_info"]["precision"],
                         init_fingerprint=getattr(model, "init_fingerprint", None))
    if datamodule.n_folds:
        write_fold_files(run_dir, datamodule, val_probs, val_labels.numpy())
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if cfg.get("report", True):
        report = write_report(run_dir, cfg, metrics, val_probs, val_labels.numpy(), csv_metrics_path(trainer))
        say(f"report: {report}")
    say(f"run folder: {run_dir}")
    say(f"best checkpoint: {metrics['best_checkpoint']}")
    say(f"metrics: {run_dir / 'metrics.json'}")
    summary = {k: round(metrics[k], 4) for k in ("val_log_loss", "val_log_loss_calibrated", "prior_log_loss",
                                                  "oracle_log_loss", "val_accuracy") if k in metrics}
    say(f"{summary}")
    for warning in metrics["warnings"]:
        log.warning(warning)
        say(f"WARNING: {warning}")


def write_fold_files(run_dir: Path, datamodule: PreferenceDataModule, probs: np.ndarray, labels: np.ndarray) -> None:
    """RUN/folds.csv (id, fold of every training row) and RUN/oof.csv (this fold's validation rows:
    id, fold, the submission's probability columns, label); a multirun over all folds combines them."""
    atomic_write_text(run_dir / "folds.csv", datamodule.fold_table().to_csv(index=False))
    oof = submission_frame(datamodule.val_ids, probs)
    oof.insert(1, "fold", datamodule.fold)
    oof["label"] = labels
    atomic_write_text(run_dir / "oof.csv", oof.to_csv(index=False, float_format=FLOAT_FORMAT))
