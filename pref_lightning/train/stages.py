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
