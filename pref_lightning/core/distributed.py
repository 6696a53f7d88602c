"""DDP: collectives issued in the same order on every rank, and DDP inside Hydra multiruns.

Collective order. Lightning computes a logged metric (and syncs it across ranks) lazily, the first time
anything reads the logged values after the epoch ends. The progress bar reads them on rank 0 alone, in
its `on_train_epoch_end` / `on_validation_end`, before the other callbacks' and the module's hooks; a
collective issued directly (`strategy.reduce`, `all_gather`) from an epoch-end hook would then meet a
metric sync on the other ranks, and every rank waits forever. So: cross-rank sums travel as logged
torchmetrics states (Lightning syncs them in the same order on every rank); a hook that must reduce
something itself calls `settle_logged_metrics` first; code run by rank 0 alone never calls collectives.

Multiruns: one process group per job, rank > 0 runs only its own job.

Lightning starts ranks > 0 by re-running the script with the same command-line arguments plus
`hydra.run.dir`. Under `-m` those arguments describe the whole sweep, so each extra rank would run
the sweep again (its own Optuna study, its own summary, and its own timestamped sweep folder unless
`hydra.sweep.dir` was given). Here ranks > 0 instead re-run just the job: its saved
`.hydra/config.yaml` as the primary config, in the job's folder. After each job the process group is
destroyed and the launcher's environment variables restored, so the next job launches fresh ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def settle_logged_metrics(trainer) -> None:
    """Compute (and so sync) every value logged so far that is still pending, on this rank, now.

    Call it on every rank before issuing a collective directly from an epoch-end hook: ranks where the
    progress bar already computed the metrics skip those syncs, the others do them here, so every rank
    reaches the direct collective with the same collectives behind it.
    """
    if getattr(trainer, "_results", None) is not None:
        trainer.callback_metrics  # noqa: B018 - the property computes every pending logged value


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """The command Lightning runs for rank `local_rank` of the current Hydra multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if not hydra_cfg.output_subdir or not (job_dir / hydra_cfg.output_subdir / "config.yaml").is_file():
        raise RuntimeError("DDP in a Hydra multirun needs the job's saved config: keep hydra.output_subdir set")
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += ["-cp", str(job_dir / hydra_cfg.output_subdir), "-cn", "config.yaml", f'hydra.run.dir="{job_dir}"',
                f"hydra.job.name={hydra_cfg.job.name}_ddp_process_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def _patch_lightning_launcher() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    original = getattr(subprocess_script, "_pref_lightning_original", subprocess_script._hydra_subprocess_cmd)

    def command(local_rank: int) -> tuple[Sequence[str], str]:
        return job_subprocess_cmd(local_rank) if _in_multirun() else original(local_rank)

    subprocess_script._pref_lightning_original = original
    subprocess_script._hydra_subprocess_cmd = command


@contextmanager
def hydra_job_processes() -> Iterator[None]:
    """Wrap one train / predict job: correct rank commands, and a clean slate for the next multirun job."""
    _patch_lightning_launcher()
    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    try:
        yield
    finally:
        if _in_multirun():
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def all_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over the DDP ranks (each holds its own share of the rows), on every
    rank; unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, [t.cpu() for t in tensors])
    return tuple(torch.cat([share[i] for share in shares]) for i in range(len(tensors)))
