"""What `train.py` and `predict.py` wrap around the pipeline: user errors as one line, little noise.

A `UserError` (a wrong path, a bad key value, a file that is not a checkpoint) prints
`error: <message>` on stderr and exits with status 2; `HYDRA_FULL_ERROR=1` shows the traceback
instead. Any other exception is a bug and keeps Hydra's report. A training run folder the failed
run left with nothing but Hydra's saved config and logs (no checkpoint, no metrics) is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pref_lightning.errors import UserError

T = TypeVar("T")

# Lightning messages that tell the user nothing (rank_zero_info lines and warnings), matched narrowly
_QUIET_INFO = (
    "💡 Tip: For seamless cloud logging",  # the litlogger advertisement
    "`Trainer(val_check_interval=",  # "was configured so validation will run at the end of the epoch"
    "`Trainer(limit_",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
_QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Precision .* is not supported by the model summary",
    # predict.py: our length-grouped sampler returns every row (gather_predictions checks it)
    r"You are using a custom batch sampler",
    # synthetic data and prediction input are in memory: workers would only add start-up time
    r".*does not have many workers which may be a bottleneck",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(message.startswith(prefix) for prefix in _QUIET_INFO)


def quiet_library_noise() -> None:
    """Silence the library messages listed above (once per process; DDP ranks run it too)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())


def run_dir_of_hydra_job() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir).resolve()


def remove_if_empty(run_dir: Path | None) -> bool:
    """Remove `run_dir` if it holds only `.hydra/` and `*.log` files (never the working folder or a
    folder above it); then its parents up to the working folder while they are empty."""
    if run_dir is None or not run_dir.is_dir():
        return False
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents:
        return False
    for path in run_dir.iterdir():
        if path.name == ".hydra" and path.is_dir():
            continue
        if not (path.is_file() and path.suffix == ".log"):
            return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != cwd and cwd in parent.parents:
        try:
            parent.rmdir()  # only while empty
        except OSError:
            break
        parent = parent.parent
    return True


def run(task: Callable[[], T], clean_run_dir: bool = False) -> T:
    """`task()`, with library noise silenced and a `UserError` turned into one line and exit status 2."""
    quiet_library_noise()
    try:
        return task()
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if clean_run_dir:
            remove_if_empty(run_dir_of_hydra_job())
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
