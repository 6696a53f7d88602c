"""Training an earlier stage first: `stage1: {experiment, dir, overrides}` in a run's config names the run whose
checkpoint a later stage reads (`model.init_from`, `model.text_anchor`, see `model.stages`); when that checkpoint
is missing, `train(cfg)` trains the stage before anything else, as its own `train.py` process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pref_lightning.core.cli import say
from pref_lightning.core.errors import UserError

log = logging.getLogger(__name__)



def stage_checkpoint(stage: Mapping[str, Any]) -> Path:
    """The best checkpoint of an earlier stage `{experiment, dir, overrides}` (RUN/checkpoints/best.ckpt)."""
    return Path(str(stage["dir"])) / "checkpoints" / "best.ckpt"


def run_first(command: list[str], product: Path, what: str, why: str) -> None:
    """Run `command` (`python -m pref_lightning...` argv) as its own process, before anything else of this run,
    to write `product`; said first as "<what>: <why> (<command>)". Only the launching process runs it: a DDP
    rank that Lightning starts later finds the file, and raises UserError when it is missing. Raises UserError
    with the command to run by hand when it fails or writes no `product`."""
    shown = " ".join(command[1:])
    if int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
        raise UserError(f"{what}: {product} is missing on a DDP rank other than 0; run it first: python {shown}")
    say(f"{what}: {why} ({shown})")
    if subprocess.run(command).returncode != 0 or not product.is_file():
        raise UserError(f"{what} failed (see its output above); run it by hand: python {shown}")


def ensure_stage(stage: Mapping[str, Any] | None, data_dir: str, seed: int) -> Path | None:
    """Train an earlier stage (`experiment=<stage.experiment>` into `stage.dir`, with `stage.overrides`) when
    its checkpoint is missing, as its own `train.py` process (its own Hydra run, logs and metrics), then
    return that checkpoint; None when `stage` names no experiment. A stage that fails raises UserError with
    the command to run by hand. Only the launching process trains it (DDP ranks that Lightning starts later
    find the file)."""
    if not stage or not stage.get("experiment"):
        return None
    checkpoint = stage_checkpoint(stage)
    if checkpoint.is_file():
        log.info("stage %s: using %s", stage["experiment"], checkpoint)
        return checkpoint
    command = [sys.executable, "-m", "pref_lightning.train", f"experiment={stage['experiment']}", f"hydra.run.dir={stage['dir']}",
               f"paths.data_dir={data_dir}", f"seed={seed}", *[str(o) for o in stage.get("overrides") or []]]
    run_first(command, checkpoint, f"stage {stage['experiment']}", f"no {checkpoint}; training it first")
    return checkpoint


def checkpoint_teacher(teacher: str) -> Path | None:
    """The checkpoint a source's `teacher` names when it is one (a `.ckpt` file, or a run folder holding
    checkpoints/best.ckpt); None for a teacher file of probabilities (`predict.py`'s output), read as it is."""
    path = Path(teacher)
    if path.suffix == ".ckpt":
        return path
    if path.is_dir():
        return path / "checkpoints" / "best.ckpt"
    return None


def teacher_files(sources: list[Any], run_dir: Path) -> list[Any]:
    """`data.sources` with each teacher that is a checkpoint or a run folder (`checkpoint_teacher`) replaced by
    the file of its predictions on that source, RUN/teachers/<i>_<source file stem>.csv, written by `predict.py`
    in its own process (reused while newer than the checkpoint and the source file). The predictions are uncalibrated
    (`calibrate=false`): a teacher's temperature is fitted on its validation rows, which in a fold run are the
    rows the student is scored on. Pseudo-labels from a model trained on the labelled rows (2nd / 3rd / 9th
    place LMSYS; `sources.py`). Raises UserError for a missing checkpoint, a failed prediction or, on a DDP
    rank other than 0, a teacher file rank 0 has not written."""
    resolved = []
    for i, source in enumerate(sources):
        checkpoint = checkpoint_teacher(str(source["teacher"])) if isinstance(source, Mapping) and \
            source.get("teacher") else None
        if checkpoint is None:
            resolved.append(source)
            continue
        if not checkpoint.is_file():
            raise UserError(f"data.sources[{i}].teacher={source['teacher']}: no checkpoint {checkpoint}")
        pool = Path(str(source["path"]))
        # numbered: two pools with the same file name in different folders keep their own teacher files
        output = run_dir / "teachers" / f"{i}_{pool.stem}.csv"
        newest_input = max(checkpoint.stat().st_mtime, pool.stat().st_mtime if pool.is_file() else 0.0)
        if not (output.is_file() and output.stat().st_mtime >= newest_input):
            output.parent.mkdir(parents=True, exist_ok=True)
            run_first([sys.executable, "-m", "pref_lightning.predict", f"ckpt_path={checkpoint}", f"input_path={pool}",
                       f"output_path={output}", "calibrate=false"], output, f"data.sources[{i}] teacher predictions",
                      f"pseudo-labels from {checkpoint}")
        resolved.append({**source, "teacher": str(output)})
    return resolved
