"""End of a Hydra multirun: `SWEEP_DIR/summary.csv` of every run, and combined out-of-fold predictions.

Hydra calls `SweepSummary.on_multirun_end` once, in the launching process, after every job of a sweep
(the basic launcher, the Optuna sweeper, or cluster jobs through submitit) has finished. Each job's
folder holds `.hydra/overrides.yaml` and, when it finished, `metrics.json` (and `oof.csv` / `folds.csv`
for k-fold runs); that is all this module reads.

Which folder a job trains in is chosen here too (`sweep_job_subdir`, Hydra's `hydra.sweep.subdir`): Hydra
numbers the jobs of every launch from 0, so a rerun of one fold into an existing sweep folder would
train into `SWEEP/0/`, over another fold's run, and `ckpt_path=last` would resume that run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pref_lightning.core.atomic import atomic_write_text
from pref_lightning.core.cli import say
from pref_lightning.core.metrics import CLASS_COLUMNS, competition_log_loss
from pref_lightning.data.records import FLOAT_FORMAT
from pref_lightning.train.resume import identity_difference

log = logging.getLogger(__name__)
METRIC_COLUMNS = ("val_log_loss", "val_log_loss_calibrated", "val_accuracy", "prior_log_loss", "gain_over_prior",
                  "epochs", "wall_seconds")
FOLD_KEY = "data.fold"
SUBDIR_RESOLVER = "pref_sweep_job"
# the combined cross-validation files combine_folds writes (and removes when they no longer match the runs)
COMBINED = ("oof.csv", "oof-*.csv", "cv_metrics.json")
_chosen: dict[tuple[str, str, str], str] = {}


def sweep_job_subdir(num: Any, *, _root_: DictConfig) -> str:
    """The folder (under `hydra.sweep.dir`) job `num` trains in. A job's configuration is its overrides
    (`hydra.overrides.task`; `ckpt_path`, which only says how to start, aside): the folder whose saved
    `.hydra/overrides.yaml` is the same configuration when one holds a run, so a rerun continues
    (`ckpt_path=last`) or replaces its own run; else `num` when that folder holds no run; else the next
    free number. A job never lands in a folder holding another configuration's run (Hydra numbers the
    jobs of every launch from 0), and a job that does not train in folder `num` says so in one line.
    Hydra's `hydra.sweep.subdir` (`${pref_sweep_job:${hydra.job.num}}`), registered when this module loads."""
    sweep = Path(str(_root_.hydra.sweep.dir))
    mine = job_configuration(OmegaConf.to_container(_root_.hydra.overrides.task))
    key = (str(sweep.resolve()), str(num), json.dumps(mine, sort_keys=True))
    if key in _chosen:  # Hydra may resolve the subdir more than once per job
        return _chosen[key]
    numbered = sorted((p for p in sweep.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    own = sweep / str(num)
    held = {p: folder_configuration(p) for p in [own, *numbered]}
    same = next((p for p in [own, *numbered] if held[p] is not None and held[p] == mine), None)
    if same is not None:
        chosen = same.name
    elif held[own] is None:
        chosen = str(num)
    else:  # a configuration no folder holds and folder `num` taken: a number no folder has (claimed atomically)
        n = int(numbered[-1].name) + 1 if numbered else 0
        while True:
            try:
                os.makedirs(sweep / str(n))
                break
            except FileExistsError:
                n += 1
        chosen = str(n)
    if chosen != str(num):
        why = (f"{own} holds the run of another configuration ({identity_difference(held[own], mine)})"
               if held[own] is not None else f"{own} holds no run")
        say(f"job {num}: {why}; this job trains in {sweep / chosen}, "
              + ("the folder of its own configuration" if same is not None else "a new folder"))
    _chosen[key] = chosen
    return chosen


def job_configuration(overrides: list[Any]) -> dict[str, str]:
    """A job's overrides as {key: value} (`+`/`~` prefixes dropped), without `ckpt_path` (how it starts)."""
    parsed = {}
    for item in overrides or []:
        name, _, value = str(item).partition("=")
        parsed[name.lstrip("+~")] = value
    parsed.pop("ckpt_path", None)
    return parsed


def folder_configuration(folder: Path) -> dict[str, str] | None:
    """The `job_configuration` of the run a job folder holds; None when it holds no run (no saved
    overrides, or neither a checkpoint nor `metrics.json`: nothing a job there would overwrite)."""
    saved = folder / ".hydra" / "overrides.yaml"
    holds_run = (folder / "metrics.json").is_file() or any((folder / "checkpoints").glob("*.ckpt"))
    if not saved.is_file() or not holds_run:
        return None
    return job_configuration(yaml.safe_load(saved.read_text()) or [])


OmegaConf.register_new_resolver(SUBDIR_RESOLVER, sweep_job_subdir, replace=True)


class SweepSummary(Callback):
    """Writes (and prints) the sweep's summary table and its cross-validation results."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = summarise_sweep(sweep_dir)
        if summary is not None:
            say(f"sweep summary ({sweep_dir / 'summary.csv'}), best first:")
            print(summary.drop(columns=["run_dir"]).to_string(index=False))
        for result in combine_folds(sweep_dir):
            loss = f"log loss {result['cv_log_loss']:.4f}" + (
                f" (calibrated; uncalibrated {result['cv_log_loss_uncalibrated']:.4f})" if result["calibrated"] else "")
            say(f"cross-validation over {result['n_folds']} folds ({result['rows']} rows)"
                  f"{' ' + result['name'] if result['name'] else ''}: {loss}, "
                  f"accuracy {result['cv_accuracy']:.4f} -> {sweep_dir / result['oof_file']}")


def _parse_overrides(path: Path) -> dict[str, str]:
    overrides = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def sweep_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job folder of a sweep, in job order: its overrides, metrics (None: unfinished) and folder."""
    runs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        folder = overrides_file.parent.parent
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        runs.append({"job": folder.name, "dir": folder, "overrides": _parse_overrides(overrides_file),
                     "metrics": metrics})
    return sorted(runs, key=lambda r: (not r["job"].isdigit(), int(r["job"]) if r["job"].isdigit() else 0, r["job"]))


def summarise_sweep(sweep_dir: Path) -> pd.DataFrame | None:
    """`summary.csv`: one row per job (overrides, final metrics, status), lowest validation log loss first."""
    runs = sweep_runs(sweep_dir)
    if not runs:
        return None
    keys = sorted({k for r in runs for k in r["overrides"]})
    rows = []
    for r in runs:
        row: dict[str, Any] = {"job": r["job"], "status": "finished" if r["metrics"] else "unfinished"}
        row.update({k: r["overrides"].get(k) for k in keys})
        row.update({m: (r["metrics"] or {}).get(m, np.nan) for m in METRIC_COLUMNS})
        row["run_dir"] = str(r["dir"])
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values("val_log_loss", na_position="last", kind="stable")
    atomic_write_text(sweep_dir / "summary.csv", frame.to_csv(index=False))
    return frame


def combine_folds(sweep_dir: Path) -> list[dict[str, Any]]:
    """Join the `oof.csv` of runs that differ only in `data.fold` (and `ckpt_path`), when they cover every fold.

    Each complete group gives an out-of-fold file with every training id exactly once (checked against
    the run's `folds.csv`) and its CV log loss / accuracy, saved in `cv_metrics.json`.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sweep_runs(sweep_dir):
        if r["metrics"] and r["metrics"].get("n_folds") and (r["dir"] / "oof.csv").is_file():
            # ckpt_path says how a run started (a rerun of a failed fold resumes it), not what it is
            key = tuple(sorted((k, v) for k, v in r["overrides"].items() if k not in (FOLD_KEY, "ckpt_path")))
            groups.setdefault(key, []).append(r)
    complete = {k: g for k, g in groups.items()
                if sorted(r["metrics"]["fold"] for r in g) == list(range(g[0]["metrics"]["n_folds"]))}
    for key, group in groups.items():
        if key not in complete:
            have = sorted(r["metrics"]["fold"] for r in group)
            log.warning("folds %s of %d finished for %s: no combined out-of-fold file", have,
                        group[0]["metrics"]["n_folds"], dict(key) or "the sweep")
    results = []
    for i, (key, group) in enumerate(complete.items()):
        name = "" if len(complete) == 1 else ",".join(f"{k}={v}" for k, v in key)
        oof_file = "oof.csv" if len(complete) == 1 else f"oof-{i}.csv"
        results.append(_combine_group(sweep_dir, group, name, oof_file))
    if results:
        atomic_write_text(sweep_dir / "cv_metrics.json", json.dumps(results, indent=2) + "\n")
    remove_stale_combined(sweep_dir, {r["oof_file"] for r in results} | ({"cv_metrics.json"} if results else set()))
    return results


def remove_stale_combined(sweep_dir: Path, written: set[str]) -> list[Path]:
    """Remove the combined CV files (`COMBINED`) of an earlier multirun end that this one did not write: they
    describe runs that are no longer complete or no longer there. Returns what was removed (said in a line)."""
    stale = sorted({p for pattern in COMBINED for p in sweep_dir.glob(pattern) if p.name not in written})
    for path in stale:
        path.unlink()
    if stale:
        say(f"removed {', '.join(p.name for p in stale)} from {sweep_dir}: an earlier combination "
              "of fold runs that no longer matches the runs there")
    return stale


def _combine_group(sweep_dir: Path, group: list[dict[str, Any]], name: str, oof_file: str) -> dict[str, Any]:
    group = sorted(group, key=lambda r: r["metrics"]["fold"])
    oof = pd.concat([pd.read_csv(r["dir"] / "oof.csv", dtype={"id": str}) for r in group], ignore_index=True)
    expected = pd.read_csv(group[0]["dir"] / "folds.csv", dtype={"id": str})
    repeated = oof["id"][oof["id"].duplicated()]
    missing = set(expected["id"]) - set(oof["id"])
    if len(repeated) or missing or len(oof) != len(expected):
        raise RuntimeError(f"{sweep_dir}: out-of-fold predictions do not cover the training ids exactly once "
                           f"({len(repeated)} repeated, {len(missing)} missing of {len(expected)})")
    order = {row_id: i for i, row_id in enumerate(expected["id"])}
    oof = oof.sort_values("id", key=lambda ids: ids.map(order), kind="stable").reset_index(drop=True)
    atomic_write_text(sweep_dir / oof_file, oof.to_csv(index=False, float_format=FLOAT_FORMAT))
    columns = [c for c in CLASS_COLUMNS if c in oof.columns]
    probs = torch.tensor(oof[columns].to_numpy(), dtype=torch.float64)
    labels = torch.tensor(oof["label"].to_numpy(), dtype=torch.long)
    metrics = [r["metrics"] for r in group]
    calibrated = all("val_log_loss_calibrated" in m for m in metrics)
    # oof.csv holds what predict.py would output: calibrated probabilities when the runs calibrated
    oof_log_loss = float(competition_log_loss(probs, labels))
    uncalibrated = [float(m["val_log_loss"]) for m in metrics]
    sizes = np.array([m.get("val_rows", 1) for m in metrics], dtype=np.float64)
    result = {"name": name, "n_folds": len(group), "rows": len(oof), "oof_file": oof_file,
              "calibrated": calibrated, "cv_log_loss": oof_log_loss,
              # a log loss is a mean over rows: the row-weighted mean of the folds' is the overall one
              "cv_log_loss_uncalibrated": float(np.dot(sizes, uncalibrated) / sizes.sum()),
              "fold_log_losses_uncalibrated": uncalibrated}
    if calibrated:
        result.update(cv_log_loss_calibrated=oof_log_loss,
                      fold_log_losses_calibrated=[float(m["val_log_loss_calibrated"]) for m in metrics])
    return {**result, "cv_accuracy": float((probs.argmax(1) == labels).double().mean()),
            "runs": [str(r["dir"]) for r in group]}
