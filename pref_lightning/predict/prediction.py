"""The prediction recipe, offline: checkpoint -> (model, tokenizer, encoding spec) -> loader -> logits
-> (ensemble) -> floored probabilities -> submission file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pref_lightning.core.cli import say
from pref_lightning.core.distributed import all_ranks, hydra_job_processes
from pref_lightning.core.errors import MissingFileError
from pref_lightning.core.metrics import competition_log_loss, mix_floor
from pref_lightning.core.runtime import instantiate_list, set_runtime_defaults
from pref_lightning.data.loaders import predict_loader
from pref_lightning.data.records import PairRecord, label_array
from pref_lightning.data.submission import submission_format, write_submission
from pref_lightning.model.checkpoint import check_checkpoint_file, recorded_precision
from pref_lightning.model.compat import check_hardware, check_max_length
from pref_lightning.model.module import PreferenceModule
from pref_lightning.predict.ensemble import check_mode, checkpoint_paths, combine, ensemble_weights

Member = tuple[list[PairRecord], np.ndarray, float]  # records, logits in input order, probability floor


def predict(cfg: DictConfig) -> Path:
    """Write the submission for `cfg.input_path` from `cfg.ckpt_path`, offline: one checkpoint, or a
    list of checkpoints / run folders averaged with `ckpt_weights` in `ensemble_mode` (see ensemble.py)."""
    with hydra_job_processes():
        return _predict(cfg)


def _predict(cfg: DictConfig) -> Path:
    paths = checkpoint_paths(cfg.ckpt_path)
    for path in paths:
        check_checkpoint_file(path)  # these checks come before Lightning prints its set-up lines
    source = choose_precision(cfg, paths)
    hardware = check_hardware(cfg)
    used = hardware.get("precision", cfg.trainer.precision)
    say(f"precision {used}: {source}" + (f"; {cfg.trainer.precision} on this machine runs as {used}"
                                         if str(used) != str(cfg.trainer.precision) else ""))
    set_runtime_defaults()
    if not Path(str(cfg.input_path)).is_file():
        raise MissingFileError(f"{cfg.input_path}: file not found (input_path)")
    weights = ensemble_weights(cfg.get("ckpt_weights"), len(paths))
    mode = check_mode(cfg.get("ensemble_mode") or "probs")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=instantiate_list(cfg.get("callbacks")),
                                     enable_checkpointing=False, **hardware)
    members = []
    for path in paths:  # one model in memory at a time: each is released before the next loads
        members.append(checkpoint_logits(cfg, path, trainer))
        release_model(trainer)
    if not trainer.is_global_zero:
        return Path(cfg.output_path)
    records = members[0][0]
    if any([r.id for r in other] != [r.id for r in records] for other, _, _ in members[1:]):
        raise RuntimeError("ensemble members predicted different rows")  # one input file: never expected
    # the output guard: the largest of the members' probability floors, applied once after averaging
    floor = max(member_floor for _, _, member_floor in members)
    probs = mix_floor(combine([logits for _, logits, _ in members], weights, mode), floor)
    output_path = write_submission(cfg.output_path, [r.id for r in records], probs, submission_format(cfg, records))
    if len(paths) > 1:
        say(f"ensemble of {len(paths)} checkpoints, {mode} averaged, weights "
              f"{[round(float(w), 4) for w in weights]}")
    say(f"wrote {len(records)} predictions to {output_path.resolve()}")
    report_labelled(paths, members, records, probs)
    return output_path


# the precision of checkpoints that record none (written before training recorded it): full precision, which
# computes what any training precision validated most closely
UNRECORDED_PRECISION = "32-true"


def choose_precision(cfg: DictConfig, paths: list) -> str:
    """Set `cfg.trainer.precision`: as given (`trainer.precision=...`), else the precision the (first)
    checkpoint was trained in, so that prediction computes what training validated. Returns why, in words."""
    if cfg.trainer.get("precision") is not None:
        return "trainer.precision given"
    recorded = [recorded_precision(path) for path in paths]
    if recorded[0] is None:
        cfg.trainer.precision = UNRECORDED_PRECISION
        return ("the checkpoint records no training precision (written before it was recorded); "
                "trainer.precision=bf16-mixed to choose another")
    cfg.trainer.precision = recorded[0]
    others = sorted({r for r in recorded[1:] if r and r != recorded[0]})
    if others:
        return (f"the first checkpoint's training precision (others were trained in {', '.join(others)}; "
                "trainer.precision=... to choose)")
    return "the checkpoint's training precision (trainer.precision=... to choose another)"


def report_labelled(paths: list, members: list[Member], records: list[PairRecord], probs: np.ndarray) -> None:
    """When every input row has a label the model can score: the log loss and accuracy (and each member's)."""
    if not all(r.label is not None and r.label < probs.shape[1] for r in records):
        return
    labels = torch.from_numpy(label_array(records))
    if len(paths) > 1:
        for path, (_, logits, member_floor) in zip(paths, members):
            loss = competition_log_loss(torch.from_numpy(mix_floor(combine([logits], [1.0]), member_floor)), labels)
            say(f"member {path}: log loss {float(loss):.4f}")
    loss = competition_log_loss(torch.from_numpy(probs), labels)
    accuracy = float((probs.argmax(1) == labels.numpy()).mean())
    say(f"input has labels: log loss {float(loss):.4f}, accuracy {accuracy:.4f}")


GPU_PREDICT_TOKENS = 65536  # max_tokens=auto on a CUDA GPU


def predict_token_budget(setting: Any, trainer: L.Trainer) -> int | None:
    """`max_tokens` of predict.py: a number, null (batch_size rows), or `auto`: GPU_PREDICT_TOKENS padded tokens
    per batch on a CUDA GPU, batch_size rows elsewhere. On 2 CPU cores a 65,536-token budget predicted at
    2.3x Trainer.predict against 5.1x for length-sorted batches of 8 (benchmarks/throughput.py): a CPU
    step's cost per token grows with the batch's size once its tensors outgrow the caches."""
    if setting is None or str(setting).lower() != "auto":
        return setting
    from lightning.pytorch.accelerators import CUDAAccelerator

    return GPU_PREDICT_TOKENS if isinstance(trainer.accelerator, CUDAAccelerator) else None


def checkpoint_logits(cfg: DictConfig, ckpt_path: str | Path, trainer: L.Trainer) -> Member | None:
    """(records, logits in input order, the model's probability floor) of one checkpoint on
    `cfg.input_path`, encoded by that checkpoint's own tokenizer and encoding spec (`max_length` may be
    overridden), with its swap TTA (or `cfg.tta_swap`); None on DDP ranks other than 0."""
    # model.backbone: where the base weights of a LoRA checkpoint are (default: the folder it names)
    model, tokenizer, spec = PreferenceModule.from_checkpoint(str(ckpt_path),
                                                              backbone=(cfg.get("model") or {}).get("backbone"))
    model.set_evaluation(tta_swap=None if cfg.get("tta_swap") is None else bool(cfg.tta_swap),
                         calibrated=bool(cfg.get("calibrate", True)))
    if cfg.get("max_length"):
        spec = spec.replace(max_length=int(cfg.max_length))
        check_max_length(model.backbone.config, spec.max_length, key="max_length", backbone=str(ckpt_path))
    records, loader = predict_loader(cfg.input_path, spec, tokenizer, cfg.batch_size,
                                     predict_token_budget(cfg.get("max_tokens"), trainer),
                                     input_format=cfg.get("input_format"), cache_dir=cfg.get("cache_dir"),
                                     replicas=trainer.world_size, rank=trainer.global_rank)
    outputs = trainer.predict(model, datamodule=OneLoader(loader))
    # each rank predicted its own share of the (unpadded) rows: collect them all (a rank may have none)
    index = torch.cat([o["index"] for o in outputs]) if outputs else torch.zeros(0, dtype=torch.long)
    logits = torch.cat([o["logits"] for o in outputs]) if outputs else torch.zeros(0, model.n_classes)
    index, logits = all_ranks(index, logits)
    if not trainer.is_global_zero:
        return None
    return (records, gather_predictions([{"index": index, "logits": logits}], len(records)),
            model.evaluation.prob_floor)


class OneLoader(L.LightningDataModule):
    """A prediction loader handed to `trainer.predict` as a datamodule: given `dataloaders=`, the trainer keeps
    the model itself as the data source of its other loops, so `release_model` could not free it."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def predict_dataloader(self) -> DataLoader:
        return self.loader


def release_model(trainer: L.Trainer) -> None:
    """Free the model the last `trainer.predict` ran: the trainer's strategy and data connector keep it (and
    its weights, a whole LLM for an ensemble of two bases) until the next call, which is after the next
    member loads; then the garbage collector and, on CUDA, the allocator's cache."""
    import gc

    strategy = trainer.strategy
    strategy._lightning_module = None
    strategy.model = None
    connector = getattr(trainer, "_data_connector", None)  # its hook selector names the model too
    if connector is not None and hasattr(connector, "_datahook_selector"):
        connector._datahook_selector = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gather_predictions(outputs: list[dict[str, torch.Tensor]], n_rows: int) -> np.ndarray:
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
