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
    if int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
        raise UserError(f"stage {stage['experiment']}: {checkpoint} is missing on a DDP rank other than 0; "
                        f"train that stage first: python train.py experiment={stage['experiment']} hydra.run.dir={stage['dir']}")
    command = [sys.executable, "-m", "pref_lightning.train", f"experiment={stage['experiment']}", f"hydra.run.dir={stage['dir']}",
               f"paths.data_dir={data_dir}", f"seed={seed}", *[str(o) for o in stage.get("overrides") or []]]
    say(f"stage {stage['experiment']}: no {checkpoint}; training it first "
          f"({' '.join(command[1:])})")
    if subprocess.run(command).returncode != 0 or not checkpoint.is_file():
        raise UserError(f"stage {stage['experiment']} failed (see its output above); run it by hand: "
                        f"python {' '.join(command[1:])}")
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
    the file of its predictions on that source, RUN/teachers/<source file stem>.csv, written by `predict.py`
    in its own process (reused while newer than the checkpoint). The predictions are uncalibrated
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
        output = run_dir / "teachers" / f"{Path(str(source['path'])).stem}.csv"
        fresh = output.is_file() and output.stat().st_mtime >= checkpoint.stat().st_mtime
        command = [sys.executable, "-m", "pref_lightning.predict", f"ckpt_path={checkpoint}",
                   f"input_path={source['path']}", f"output_path={output}", "calibrate=false"]
        if not fresh:
            if int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
                raise UserError(f"data.sources[{i}]: the teacher file {output} is missing on a DDP rank other than 0; "
                                f"write it first: python {' '.join(command[1:])}")
            output.parent.mkdir(parents=True, exist_ok=True)
            say(f"data.sources[{i}]: pseudo-labels from {checkpoint} ({' '.join(command[1:])})")
            if subprocess.run(command).returncode != 0 or not output.is_file():
                raise UserError(f"data.sources[{i}]: the teacher's predictions failed (see its output above); run "
                                f"by hand: python {' '.join(command[1:])}")
        resolved.append({**source, "teacher": str(output)})
    return resolved
