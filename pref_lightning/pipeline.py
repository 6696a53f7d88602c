"""Shared building code for `train.py` and `predict.py`: config -> objects -> run -> files."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pref_lightning.atomic import atomic_path, atomic_write_text
from pref_lightning.backbone import TINY, cached_trained_tokenizer, load_tokenizer, tokenizer_files
from pref_lightning.calibration import collect_logits, fit_temperature
from pref_lightning.datamodule import PreferenceDataModule
from pref_lightning.metrics import competition_log_loss
from pref_lightning.module import CHECKPOINT_KEY, PreferenceModule
from pref_lightning.records import CLASS_NAMES, label_array

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
    started = time.perf_counter()
    set_runtime_defaults()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)

    datamodule: PreferenceDataModule = instantiate(cfg.data)
    datamodule.load_records()
    tokenizer = build_tokenizer(cfg.model, datamodule)
    datamodule.attach_tokenizer(tokenizer)

    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
                                     logger=instantiate_list(cfg.get("logger")) or False)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                    if k not in ("tokenizer", "tokenizer_vocab_size", "cache_dir")}
    model: PreferenceModule = instantiate(model_kwargs, vocab_size=len(tokenizer), layout=datamodule.layout,
                                          n_classes=datamodule.n_classes, _convert_="all")
    # the tokenizer travels inside every checkpoint; rank 0 also leaves a copy in the run folder
    model.tokenizer_files = tokenizer_files(tokenizer, run_dir / "tokenizer" if trainer.is_global_zero else None)
    datamodule.setup("fit")  # tokenizes once and fits the statistics' normalisation (kept for prediction)
    model.data_settings = datamodule.settings()
    model.reference = datamodule.validation_reference()
    model.train_prior = datamodule.train_prior.tolist()

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    calibration = calibrate(model, datamodule, best if trainer.is_global_zero else None,
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
    metrics["gain_over_prior"] = metrics["prior_log_loss"] - metrics["val_log_loss"]
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(f"[pref-lightning] run folder: {run_dir}")
        print(f"[pref-lightning] best checkpoint: {metrics['best_checkpoint']}")
        print(f"[pref-lightning] metrics: {run_dir / 'metrics.json'}")
        summary = {k: round(metrics[k], 4) for k in ("val_log_loss", "val_log_loss_calibrated", "prior_log_loss",
                                                      "oracle_log_loss", "val_accuracy") if k in metrics}
        print(f"[pref-lightning] {summary}")
    return metrics


def calibrate(model: PreferenceModule, datamodule: PreferenceDataModule, checkpoint: str | None,
              enabled: bool = True) -> dict[str, float]:
    """Fit a temperature on the validation logits of `model` (the best weights) and store it in
    `checkpoint` (rank 0 passes the path, other ranks None). Returns the log loss before and after."""
    if not enabled:
        return {}
    logits, labels = collect_logits(model, datamodule.val_dataloader(), tta_swap=model.hparams.tta_swap)
    temperature = fit_temperature(logits, labels)
    model.temperature = temperature
    before = float(competition_log_loss(logits.softmax(-1), labels))
    after = float(competition_log_loss((logits / temperature).softmax(-1), labels))
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state[CHECKPOINT_KEY]["temperature"] = temperature
        atomic_torch_save(state, checkpoint)
    return {"temperature": temperature, "val_log_loss_uncalibrated": before, "val_log_loss_calibrated": after}


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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def submission_frame(ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Kaggle columns: id and one probability per class (a binary model has no winner_tie column)."""
    frame = pd.DataFrame({"id": ids})
    for j, name in enumerate(CLASS_NAMES[: probs.shape[1]]):
        frame[name] = probs[:, j]
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
        raise ValueError(f"submission_format={chosen!r}; choose from {', '.join(SUBMISSION_FORMATS)}")
    return chosen


def predict(cfg: DictConfig) -> Path:
    """Write the Kaggle submission for `cfg.input_path` from `cfg.ckpt_path`, offline."""
    set_runtime_defaults()
    model, tokenizer, settings = PreferenceModule.from_checkpoint(cfg.ckpt_path)
    if cfg.get("tta_swap") is not None:
        model.hparams.tta_swap = bool(cfg.tta_swap)
    model.apply_temperature = bool(cfg.get("calibrate", True))
    datamodule = PreferenceDataModule(predict_path=cfg.input_path, eval_batch_size=cfg.batch_size,
                                      max_length=int(cfg.get("max_length") or settings["max_length"]),
                                      prompt_fraction=float(settings["prompt_fraction"]),
                                      stats_norm=settings["stats_norm"],
                                      layout=settings.get("layout", "siamese"),
                                      naive_truncation=bool(settings.get("naive_truncation", False)),
                                      predict_format=cfg.get("input_format"))
    datamodule.attach_tokenizer(tokenizer)
    datamodule.setup("predict")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    outputs = trainer.predict(model, datamodule=datamodule)
    records = datamodule.predict_records
    if trainer.world_size > 1:
        # each rank predicted its own share of the (unpadded) batches: collect them all on rank 0
        import torch.distributed as dist

        shares: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(shares, [{k: v.cpu() for k, v in o.items()} for o in outputs])
        outputs = [o for share in shares for o in share]
        if not trainer.is_global_zero:
            return Path(cfg.output_path)
    probs = softmax(gather_predictions(outputs, len(records)))
    output_path = Path(cfg.output_path)
    ids = [r.id for r in records]
    kind = submission_format(cfg, records)
    frame = winner_frame(ids, probs) if kind == "wsdm" else submission_frame(ids, probs)
    atomic_write_text(output_path, frame.to_csv(index=False))
    print(f"[pref-lightning] wrote {len(records)} predictions to {output_path.resolve()}")
    labelled = [i for i, r in enumerate(records) if r.label is not None and r.label < probs.shape[1]]
    if len(labelled) == len(records):
        loss = competition_log_loss(torch.from_numpy(probs), torch.from_numpy(label_array(records)))
        accuracy = float((probs.argmax(1) == label_array(records)).mean())
        print(f"[pref-lightning] input has labels: log loss {float(loss):.4f}, accuracy {accuracy:.4f}")
    return output_path
