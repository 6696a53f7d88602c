"""Which checkpoint a training run resumes from (`ckpt_path`): a file, a run folder, or `last`; and what
makes two runs the same configuration (`run_identity`), so that a run folder or a `last.ckpt` is only ever
continued by the configuration it holds."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from pref_lightning.core.cli import current_targets, say
from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.model.checkpoint import check_checkpoint_file

# config keys that say where or how fast a run reads, not what it trains on or with
NOT_IDENTITY = frozenset({"num_workers", "eval_batch_size", "eval_max_tokens", "cache_dir"})
IDENTITY_SECTIONS = ("data", "model")


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
            return checked(str(own), cfg)
        # never guess another folder: DDP ranks and multirun jobs must all resolve the same file
        others = same_config_runs(cfg, run_dir)
        hint = f"; the newest run of this config with one is {others[-1]} (pass it as ckpt_path)" if others else ""
        say(f"ckpt_path=last: no last.ckpt in {run_dir / 'checkpoints'}, starting fresh{hint}")
        return None
    path = Path(str(value))
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return checked(str(candidate), cfg)
        raise MissingFileError(f"ckpt_path={value}: no checkpoints/last.ckpt in that run folder")
    if not path.is_file():
        raise MissingFileError(f"ckpt_path={value}: no such checkpoint file")
    check_checkpoint_file(path)
    return checked(str(path), cfg)


def checked(path: str, cfg: DictConfig) -> str:
    """`path` when the checkpoint was trained with this configuration (or records none: older files);
    `UserError` naming the settings that differ otherwise."""
    saved = saved_identity(path)
    if saved is None:
        return path
    changed = identity_difference(saved, run_identity(cfg))
    if changed:
        raise UserError(f"ckpt_path={cfg.get('ckpt_path')}: {path} was trained with another configuration "
                        f"({changed}); resume it with its own settings, or train this one in a new run folder "
                        "(another hydra.run.dir, without ckpt_path)")
    return path


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


# ---- what a run is: the same configuration or another ---------------------------------------------
def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if str(key) not in NOT_IDENTITY:
                out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: node}


def run_identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """What a run trains on and with: every key of its `data` (files, folds, encoding) and `model` sections
    and its `seed`, flat (`{"data.fold": 2, ...}`), unresolved (`${paths.data_dir}/train.csv` is the same
    file wherever the run folder lives), without `NOT_IDENTITY` keys. Plain values only (stored in
    `last.ckpt`, read back with `weights_only=True`)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    identity: dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        node = cfg.get(section)
        if node is not None:
            identity.update(_flat(OmegaConf.to_container(node, resolve=False), section))
    identity["seed"] = cfg.get("seed")
    return identity


def identity_difference(there: dict[str, Any], here: dict[str, Any], limit: int = 4) -> str:
    """The settings that differ between two `run_identity`s, in words ("" when none):
    `data.fold=0 there, data.fold=2 here`."""
    keys = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
    words = [f"{k}={there.get(k)} there, {k}={here.get(k)} here" for k in keys[:limit]]
    if len(keys) > limit:
        words.append(f"{len(keys) - limit} more")
    return "; ".join(words)


def saved_identity(checkpoint: str | Path) -> dict[str, Any] | None:
    """The `run_identity` a full `last.ckpt` was trained with (`RunIdentity`'s state); None when it has
    none (written before it was recorded, a weights-only file, not a checkpoint: Lightning says so)."""
    if not zipfile.is_zipfile(checkpoint):
        return None
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = (state.get("callbacks") or {}).get(RunIdentity.__qualname__) if isinstance(state, dict) else None
    return dict(record["identity"]) if isinstance(record, dict) and record.get("identity") is not None else None


def folder_identity(folder: Path) -> dict[str, Any] | None:
    """The `run_identity` of the run a folder holds (its `.hydra/config.yaml`); None when it holds no run
    (no saved config, or neither a checkpoint nor `metrics.json`: nothing a rerun would overwrite)."""
    saved = folder / ".hydra" / "config.yaml"
    holds_run = (folder / "metrics.json").is_file() or any((folder / "checkpoints").glob("*.ckpt"))
    if not saved.is_file() or not holds_run:
        return None
    return run_identity(OmegaConf.load(saved))


class RunIdentity(L.Callback):
    """Records the run's `run_identity` in `last.ckpt`, so that `ckpt_path` resumes it only into the same
    configuration (`checked`, before fitting)."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: `checked` compared the saved identity before the fit began."""


def check_run_folder(argv: list[str], conf_dir: Path, config_name: str = "train") -> None:
    """A single run (`hydra.run.dir=RUN`) into a folder that holds another configuration's run: one
    `error:` line naming both and the fix, exit status 2, before Hydra writes into the folder (its
    `.hydra/` would be replaced, then the checkpoints and metrics). Multiruns choose their job folders
    in `sweep.sweep_job_subdir`; a DDP rank relaunched with its job's own config (`-cp`/`-cn`) is not checked.
    An override Hydra cannot compose is left to Hydra's own message."""
    if any(a in ("-m", "--multirun") or a.startswith(("-c", "--config")) for a in argv):
        return
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not run_dirs:
        return
    folder = Path(run_dirs[-1].strip("'\""))
    there = folder_identity(folder)
    if there is None:
        return
    overrides = [a for a in argv if "=" in a and not a.startswith(("hydra.", "hydra/", "-", "+hydra", "~hydra"))]
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except Exception:  # Hydra's own message follows when main() composes the same overrides
        return
    changed = identity_difference(there, run_identity(cfg))
    if changed:
        print(f"error: hydra.run.dir={run_dirs[-1]} holds the run of another configuration ({changed}); train "
              "this one in a new folder (another hydra.run.dir), or pass that run's own settings to continue it",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
