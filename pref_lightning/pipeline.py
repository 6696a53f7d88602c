"""Shared building code for `train.py` and `predict.py`: config -> objects -> run -> files."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from pref_lightning.anchor import anchor_log_loss
from pref_lightning.atomic import atomic_path, atomic_write_text
from pref_lightning.backbone import TINY, cached_trained_tokenizer, load_tokenizer, tokenizer_files
from pref_lightning.calibration import TEMPERATURE_RANGE, fit_temperature
from pref_lightning.callbacks import SigtermCheckpoint, drop_progress_bars
from pref_lightning.compat import check_backbone_settings, check_hardware, check_max_length
from pref_lightning.datamodule import PreferenceDataModule
from pref_lightning.distributed import hydra_job_processes
from pref_lightning.ensemble import (
    check_mode,
    checkpoint_paths,
    combine,
    ensemble_weights,
)
from pref_lightning.errors import MissingFileError, UserError
from pref_lightning.metrics import competition_log_loss, mix_floor
from pref_lightning.module import CHECKPOINT_KEY, PreferenceModule, check_checkpoint_file
from pref_lightning.records import CLASS_NAMES, FLOAT_FORMAT, label_array
from pref_lightning.report import csv_metrics_path, write_report

log = logging.getLogger(__name__)


def set_runtime_defaults() -> None:
    # TF32 matmuls on GPUs that have them (flushing CPU denormals is done by the module's loop hooks)
    torch.set_float32_matmul_precision("high")


def build_tokenizer(model_cfg: DictConfig, datamodule: PreferenceDataModule):
    """The tokenizer named by the model config; for the tiny backbone, one trained on the train texts."""
    if model_cfg.backbone == TINY and not model_cfg.get("tokenizer"):
        return cached_trained_tokenizer(datamodule.tokenizer_texts(), int(model_cfg.tokenizer_vocab_size),
                                        model_cfg.get("cache_dir"))
    return load_tokenizer(model_cfg.get("tokenizer") or model_cfg.backbone)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers); skip the rest."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir).resolve()


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

    # settings that contradict the backbone are refused before any data is read
    tokenizer = check_backbone_settings(cfg)
    datamodule: PreferenceDataModule = instantiate(cfg.data)
    datamodule.load_records()
    tokenizer = tokenizer or build_tokenizer(cfg.model, datamodule)
    datamodule.attach_tokenizer(tokenizer)

    callbacks = drop_progress_bars(instantiate_list(cfg.get("callbacks")), cfg.trainer.get("enable_progress_bar", True))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks,
                                     logger=instantiate_list(cfg.get("logger")) or False, **hardware)
    datamodule.setup("fit")  # tokenizes once and fits the statistics' normalisation (kept for prediction)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                    if k not in ("tokenizer", "tokenizer_vocab_size", "cache_dir")}
    # the anchored head starts from the statistics' regression fitted on the training split
    anchor = datamodule.fit_anchor() if model_kwargs.get("anchor_head") else None
    model: PreferenceModule = instantiate(model_kwargs, vocab_size=len(tokenizer), layout=datamodule.layout,
                                          augment_seed=int(cfg.seed), n_classes=datamodule.n_classes,
                                          anchor=anchor, _convert_="all")
    # the tokenizer travels inside every checkpoint; rank 0 also leaves a copy in the run folder
    model.tokenizer_files = tokenizer_files(tokenizer, run_dir / "tokenizer" if trainer.is_global_zero else None)
    model.data_settings = datamodule.settings()
    model.reference = datamodule.validation_reference()
    if anchor is not None:  # the anchored model's step-0 validation loss: what training must beat
        model.reference["baseline_log_loss"] = anchor_log_loss(anchor, *datamodule.split_statistics("val"),
                                                               model.hparams.tta_swap, model.hparams.prob_floor)
    model.train_prior = datamodule.train_prior.tolist()

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg))
    except SIGTERMException:
        # Lightning's exception exits with status 0; a scheduler must see that the job did not finish
        saved = next((c.saved_path for c in trainer.callbacks if isinstance(c, SigtermCheckpoint)), None)
        if trainer.is_global_zero:
            print(f"[pref-lightning] SIGTERM: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}"
                  + (f"; resume with: python train.py ckpt_path=last hydra.run.dir={run_dir}" if saved else ""))
        # ranks this process launched may be blocked in a collective with it: end them, as Lightning does
        # on Ctrl+C (the checkpoint is saved; their replicas hold nothing more)
        launcher = trainer.strategy.launcher
        if launcher is not None and hasattr(launcher, "procs"):
            launcher.kill(signal.SIGKILL)
        raise SystemExit(143) from None

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results, val_logits, val_labels = validate_best(trainer, model, datamodule, best)
    calibration = calibrate(model, val_logits, val_labels, best if trainer.is_global_zero else None,
                            enabled=bool(cfg.get("calibrate", True)))
    metrics = {
        "val_log_loss": float(results["val/log_loss"]),
        "val_accuracy": float(results["val/accuracy"]),
        **calibration,
        **{k: float(v) for k, v in model.reference.items()},
        "train_rows": len(datamodule.train_records),
        "val_rows": len(datamodule.val_records),
        "data": datamodule.source_name,
        "n_classes": datamodule.n_classes,
        "data_counts": datamodule.data_counts,  # rows read / skipped / deduplicated per file
        "backbone": cfg.model.backbone,
        "epochs": trainer.current_epoch,
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    for reference in ("prior", "uniform", "val_prior", "baseline"):  # gains over each reference present
        if f"{reference}_log_loss" in metrics:
            metrics[f"gain_over_{reference}"] = metrics[f"{reference}_log_loss"] - metrics["val_log_loss"]
    metrics["warnings"] = health_warnings(metrics)
    if datamodule.n_folds:
        metrics.update(n_folds=datamodule.n_folds, fold=datamodule.fold)
    if trainer.is_global_zero:
        val_probs = model.probabilities(val_logits, calibrated=True).numpy()  # what predict.py would output
        if datamodule.n_folds:
            write_fold_files(run_dir, datamodule, val_probs, val_labels.numpy())
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if cfg.get("report", True):
            report = write_report(run_dir, cfg, metrics, val_probs, val_labels.numpy(), csv_metrics_path(trainer))
            print(f"[pref-lightning] report: {report}")
        print(f"[pref-lightning] run folder: {run_dir}")
        print(f"[pref-lightning] best checkpoint: {metrics['best_checkpoint']}")
        print(f"[pref-lightning] metrics: {run_dir / 'metrics.json'}")
        summary = {k: round(metrics[k], 4) for k in ("val_log_loss", "val_log_loss_calibrated", "prior_log_loss",
                                                      "oracle_log_loss", "val_accuracy") if k in metrics}
        print(f"[pref-lightning] {summary}")
        for warning in metrics["warnings"]:
            log.warning(warning)
            print(f"[pref-lightning] WARNING: {warning}")
    return metrics


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint file `ckpt_path` names: a file, a run folder (its `checkpoints/last.ckpt`), or `last`.

    `last` is this run folder's `checkpoints/last.ckpt` (rerun with `hydra.run.dir=RUN`, or rerun the
    same multirun with `hydra.sweep.dir=SWEEP`: finished jobs' folders have one, unstarted ones start
    fresh). Nothing found: a fresh start, said so, naming the newest sibling run that has one.
    """
    value = cfg.get("ckpt_path")
    if not value:
        return None
    run_dir = output_dir(cfg)
    if str(value) == "last":
        own = run_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        # never guess another folder: DDP ranks and multirun jobs must all resolve the same file
        others = same_config_runs(cfg, run_dir)
        hint = f"; the newest run of this config with one is {others[-1]} (pass it as ckpt_path)" if others else ""
        print(f"[pref-lightning] ckpt_path=last: no last.ckpt in {run_dir / 'checkpoints'}, starting fresh{hint}")
        return None
    path = Path(str(value))
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise MissingFileError(f"ckpt_path={value}: no checkpoints/last.ckpt in that run folder")
    if not path.is_file():
        raise MissingFileError(f"ckpt_path={value}: no such checkpoint file")
    check_checkpoint_file(path)
    return str(path)


def same_config_runs(cfg: DictConfig, run_dir: Path, keys: tuple[str, ...] = ("model", "data")) -> list[Path]:
    """Sibling run folders holding a `last.ckpt` whose saved `.hydra/config.yaml` has the same `keys`
    sections as `cfg`, oldest first."""
    mine = {k: OmegaConf.to_container(cfg[k], resolve=False) if k in cfg else None for k in keys}
    found = []
    for last in run_dir.parent.glob("*/checkpoints/last.ckpt"):
        folder = last.parent.parent
        saved = folder / ".hydra" / "config.yaml"
        if folder == run_dir or not saved.is_file():
            continue
        other = OmegaConf.load(saved)
        if all((OmegaConf.to_container(other[k], resolve=False) if k in other else None) == v for k, v in mine.items()):
            found.append((last.stat().st_mtime, folder))
    return [folder for _, folder in sorted(found)]


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
    temperature = fit_temperature(logits, labels, floor=model.hparams.prob_floor)
    model.temperature = temperature
    after = float(competition_log_loss(model.probabilities(logits, calibrated=True), labels))
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state[CHECKPOINT_KEY]["temperature"] = temperature
        atomic_torch_save(state, checkpoint)
    return {"temperature": temperature, "val_log_loss_uncalibrated": before, "val_log_loss_calibrated": after,
            "temperature_at_bound": temperature in TEMPERATURE_RANGE}


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


def write_fold_files(run_dir: Path, datamodule: PreferenceDataModule, probs: np.ndarray, labels: np.ndarray) -> None:
    """RUN/folds.csv (id, fold of every training row) and RUN/oof.csv (this fold's validation rows:
    id, fold, the submission's probability columns, label); a multirun over all folds combines them."""
    atomic_write_text(run_dir / "folds.csv", datamodule.fold_table().to_csv(index=False))
    oof = submission_frame(datamodule.val_ids, probs)
    oof.insert(1, "fold", datamodule.fold)
    oof["label"] = labels
    atomic_write_text(run_dir / "oof.csv", oof.to_csv(index=False, float_format=FLOAT_FORMAT))


def all_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over the DDP ranks (each holds its own share of the rows), on every
    rank; unchanged in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, [t.cpu() for t in tensors])
    return tuple(torch.cat([share[i] for share in shares]) for i in range(len(tensors)))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def gather_predictions(outputs: Iterable[dict[str, torch.Tensor]], n_rows: int) -> np.ndarray:
    """Logits in input order, checking that every row was predicted exactly once."""
    index = torch.cat([o["index"] for o in outputs]).numpy()
    logits = torch.cat([o["logits"] for o in outputs]).numpy()
    counts = np.bincount(index, minlength=n_rows)
    if len(counts) != n_rows or (counts != 1).any():
        missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
        raise RuntimeError(f"prediction covered rows unevenly: {len(missing)} missing, {len(repeated)} repeated")
    ordered = np.empty_like(logits)
    ordered[index] = logits
    return ordered


def submission_frame(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Kaggle columns: id and one probability per class (a binary model has no winner_tie column)."""
    frame = pd.DataFrame({"id": ids})
    for j, name in enumerate(CLASS_NAMES[: probs.shape[1]]):
        frame[name] = probs[:, j].astype(np.float64)  # one text format for float32 and float64 models
    return frame


def winner_frame(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """WSDM Cup columns: id, winner in {model_a, model_b} (the likelier of the two; ties are not an answer)."""
    return pd.DataFrame({"id": ids, "winner": np.where(probs[:, 0] >= probs[:, 1], "model_a", "model_b")})


SUBMISSION_FORMATS = ("kaggle", "wsdm")


def submission_format(cfg: DictConfig, records) -> str:
    """`submission_format` as configured, else `wsdm` for WSDM input, else `kaggle`."""
    chosen = cfg.get("submission_format")
    if chosen is None:
        formats = {r.extra.get("format") for r in records[:1]}
        chosen = "wsdm" if formats == {"wsdm"} else "kaggle"
    if chosen not in SUBMISSION_FORMATS:
        raise UserError(f"submission_format={chosen!r}; choose from {', '.join(SUBMISSION_FORMATS)}")
    return chosen


def predict(cfg: DictConfig) -> Path:
    """Write the Kaggle submission for `cfg.input_path` from `cfg.ckpt_path`, offline: one checkpoint, or
    a list of checkpoints / run folders averaged with `ckpt_weights` in `ensemble_mode` (see ensemble.py)."""
    with hydra_job_processes():
        return _predict(cfg)


def _predict(cfg: DictConfig) -> Path:
    hardware = check_hardware(cfg)
    set_runtime_defaults()
    paths = checkpoint_paths(cfg.ckpt_path)
    for path in paths:
        check_checkpoint_file(path)  # these checks come before Lightning prints its set-up lines
    if not Path(str(cfg.input_path)).is_file():
        raise MissingFileError(f"{cfg.input_path}: file not found (input_path)")
    weights = ensemble_weights(cfg.get("ckpt_weights"), len(paths))
    mode = check_mode(cfg.get("ensemble_mode") or "probs")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, **hardware)
    members = [checkpoint_logits(cfg, path, trainer) for path in paths]
    if not trainer.is_global_zero:
        return Path(cfg.output_path)
    records = members[0][0]
    if any([r.id for r in other] != [r.id for r in records] for other, _, _ in members[1:]):
        raise RuntimeError("ensemble members predicted different rows")  # one input file: never expected
    # the output guard: the largest of the members' probability floors, applied once after averaging
    floor = max(member_floor for _, _, member_floor in members)
    probs = mix_floor(combine([logits for _, logits, _ in members], weights, mode), floor)
    output_path = Path(cfg.output_path)
    ids = [r.id for r in records]
    frame = winner_frame(ids, probs) if submission_format(cfg, records) == "wsdm" else submission_frame(ids, probs)
    atomic_write_text(output_path, frame.to_csv(index=False, float_format=FLOAT_FORMAT))
    if len(paths) > 1:
        print(f"[pref-lightning] ensemble of {len(paths)} checkpoints, {mode} averaged, weights "
              f"{[round(float(w), 4) for w in weights]}")
    print(f"[pref-lightning] wrote {len(records)} predictions to {output_path.resolve()}")
    labelled = [i for i, r in enumerate(records) if r.label is not None and r.label < probs.shape[1]]
    if len(labelled) == len(records):
        labels = torch.from_numpy(label_array(records))
        if len(paths) > 1:
            for path, (_, logits, member_floor) in zip(paths, members):
                loss = competition_log_loss(torch.from_numpy(mix_floor(combine([logits], [1.0]), member_floor)), labels)
                print(f"[pref-lightning] member {path}: log loss {float(loss):.4f}")
        loss = competition_log_loss(torch.from_numpy(probs), labels)
        accuracy = float((probs.argmax(1) == labels.numpy()).mean())
        print(f"[pref-lightning] input has labels: log loss {float(loss):.4f}, accuracy {accuracy:.4f}")
    return output_path


def checkpoint_logits(cfg: DictConfig, ckpt_path: str | Path, trainer: L.Trainer) -> tuple[list, np.ndarray, float] | None:
    """(records, logits in input order, the model's probability floor) of one checkpoint on
    `cfg.input_path`, with that model's own tokenizer, data settings and swap TTA (or `cfg.tta_swap`);
    None on DDP ranks other than 0."""
    # model.backbone: where the base weights of a LoRA checkpoint are (default: the folder it names)
    model, tokenizer, settings = PreferenceModule.from_checkpoint(str(ckpt_path),
                                                                  backbone=cfg.get("model", {}).get("backbone"))
    if cfg.get("tta_swap") is not None:
        model.hparams.tta_swap = bool(cfg.tta_swap)
    model.apply_temperature = bool(cfg.get("calibrate", True))
    max_length = int(cfg.get("max_length") or settings["max_length"])
    check_max_length(model.backbone.config, max_length, key="max_length", backbone=str(ckpt_path))
    datamodule = PreferenceDataModule(predict_path=cfg.input_path, eval_batch_size=cfg.batch_size,
                                      max_length=max_length,
                                      prompt_fraction=float(settings["prompt_fraction"]),
                                      stats_norm=settings["stats_norm"],
                                      layout=settings.get("layout", "siamese"),
                                      naive_truncation=bool(settings.get("naive_truncation", False)),
                                      cache_dir=cfg.get("cache_dir"), predict_format=cfg.get("input_format"))
    datamodule.attach_tokenizer(tokenizer)
    datamodule.setup("predict")
    outputs = trainer.predict(model, datamodule=datamodule)
    records = datamodule.predict_records
    # each rank predicted its own share of the (unpadded) rows: collect them all (a rank may have none)
    index = torch.cat([o["index"] for o in outputs]) if outputs else torch.zeros(0, dtype=torch.long)
    logits = torch.cat([o["logits"] for o in outputs]) if outputs else torch.zeros(0, model.hparams.n_classes)
    index, logits = all_ranks(index, logits)
    if not trainer.is_global_zero:
        return None
    return (records, gather_predictions([{"index": index, "logits": logits}], len(records)),
            float(model.hparams.prob_floor))
