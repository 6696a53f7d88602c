"""Which checkpoint a training run resumes from (`ckpt_path`): a file, a run folder, or `last`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pref_lightning.core.cli import current_targets
from pref_lightning.core.errors import MissingFileError
from pref_lightning.model.checkpoint import check_checkpoint_file


def output_dir(cfg: DictConfig) -> Path:
    """The run folder (`paths.output_dir`, Hydra's run directory by default), absolute."""
    return Path(cfg.paths.output_dir).resolve()


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
    # configs saved before the wings layout name old modules in `_target_`: compared as today's
    mine = {k: current_targets(OmegaConf.to_container(cfg[k], resolve=False)) if k in cfg else None for k in keys}
    found = []
    for last in run_dir.parent.glob("*/checkpoints/last.ckpt"):
        folder = last.parent.parent
        saved = folder / ".hydra" / "config.yaml"
        if folder == run_dir or not saved.is_file():
            continue
        other = OmegaConf.load(saved)
        if all((current_targets(OmegaConf.to_container(other[k], resolve=False)) if k in other else None) == v
               for k, v in mine.items()):
            found.append((last.stat().st_mtime, folder))
    return [folder for _, folder in sorted(found)]
