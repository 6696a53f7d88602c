"""What `train.py` and `predict.py` wrap around the pipeline: user errors as one line, little noise.

A `UserError` (a wrong path, a bad key value, a file that is not a checkpoint) prints
`error: <message>` on stderr and exits with status 2; `HYDRA_FULL_ERROR=1` shows the traceback
instead. Any other exception is a bug and keeps Hydra's report. A training run folder the failed
run left with nothing but Hydra's saved config and logs (no checkpoint, no metrics) is removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pref_lightning.core.errors import UserError

T = TypeVar("T")

# Lightning messages that tell the user nothing (rank_zero_info lines and warnings), matched narrowly
_QUIET_INFO = (
    "💡 Tip: For seamless cloud logging",  # the litlogger advertisement
    "`Trainer(val_check_interval=",  # "was configured so validation will run at the end of the epoch"
    "`Trainer(limit_",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
# seed_everything's line ("[rank: N] " prefixed under DDP): the seed is in the config, and an `error:` line
# at start stays the only line
_QUIET_CONTAINING = ("Seed set to ",)
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
        return not (any(message.startswith(prefix) for prefix in _QUIET_INFO)
                    or any(part in message for part in _QUIET_CONTAINING))


def quiet_library_noise() -> None:
    """Silence the library messages listed above (once per process; DDP ranks run it too)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
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


# Modules of the flat layout before the wings redesign (0.1 -> 0.2): `_target_` strings in configs saved by
# older runs (RUN/.hydra/config.yaml) name them. Old name -> its module today.
MOVED_MODULES = {
    **{m: f"core.{m}" for m in ("errors", "atomic", "metrics", "losses", "distributed", "cli", "runinfo")},
    **{m: f"data.{m}" for m in ("records", "adapters", "sources", "folds", "text_stats", "stats_norm", "contract",
                                "pairs", "collate", "sampler", "cache", "teacher", "synthetic", "datamodule",
                                "submission")},
    **{m: f"model.{m}" for m in ("backbone", "head", "anchor", "lora", "module", "checkpoint", "compat", "stages")},
    **{m: f"train.{m}" for m in ("training", "callbacks", "prior_guard", "calibration", "resume", "loggers",
                                 "report", "sweep")},
    **{m: f"predict.{m}" for m in ("prediction", "ensemble")},
}
_OLD_TARGET = re.compile(r"pref_lightning\.(" + "|".join(MOVED_MODULES) + r")\.([A-Za-z_][A-Za-z0-9_.]*)")


def current_target(target: str) -> str:
    """A `_target_` of the flat layout rewritten to today's module (`pref_lightning.module.PreferenceModule`
    -> `pref_lightning.model.module.PreferenceModule`); any other string unchanged."""
    match = _OLD_TARGET.fullmatch(target)
    return f"pref_lightning.{MOVED_MODULES[match.group(1)]}.{match.group(2)}" if match else target


def current_targets(node: Any) -> Any:
    """A config container (dicts and lists) with every old-layout `_target_` rewritten by `current_target`."""
    if isinstance(node, dict):
        return {k: current_target(v) if k == "_target_" and isinstance(v, str) else current_targets(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [current_targets(v) for v in node]
    return node


def say(message: str) -> None:
    """One `[pref-lightning] ...` line for the user on stdout, from the first process only (DDP ranks > 0 run
    the same code): every message of this package that is not a log record or an `error:` line."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"[pref-lightning] {message}", flush=True)


def user_error(err: BaseException) -> UserError | None:
    """`err` itself when a `UserError`, or the `UserError` that Hydra's `instantiate` wrapped in its
    "Error in call to target" exception (a constructor refusing a setting); a config naming a module of the
    old flat layout (a saved run config) becomes a UserError naming its new place; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        # hydra's instantiate says "Error locating target", its get_class "Error loading"
        old = _OLD_TARGET.search(str(err))
        if old and ("Error locating target" in str(err) or "Error loading" in str(err)):
            return UserError(f"_target_ {old.group(0)} names a module of the layout before 0.2 (a config saved by "
                             f"an older run); it is now {current_target(old.group(0))}: change the _target_ in "
                             "that config, or rerun with today's conf/ and the same overrides")
        if type(err).__name__ != "InstantiationException":
            return None
        err = err.__cause__
    return None


def run(task: Callable[[], T], clean_run_dir: bool = False) -> T:
    """`task()`, with library noise silenced and a `UserError` turned into one line and exit status 2."""
    quiet_library_noise()
    try:
        return task()
    except Exception as raised:
        err = user_error(raised)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if clean_run_dir:
            remove_if_empty(run_dir_of_hydra_job())
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---- override keys: a typo reads as one line, before Hydra composes (and makes a run folder) ---------
# the configs ship inside the package (the repository's top-level conf/ is a link to them)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _config_groups(conf_dir: Path) -> set[str]:
    """Config group paths under `conf_dir` ("data", "model", "hydra/launcher", ...)."""
    return {p.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*") if p.is_dir()}


def _first_choice(override: Any) -> str:
    """The override line with a sweep (`a,b`, `range(...)`) replaced by its first value."""
    if not override.is_sweep_override():
        return override.input_line
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg` (dict nodes and leaves, mandatory `???` values included; lists not entered)."""
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none() \
                and not node._is_interpolation():
            keys.extend(config_keys(node, path + "."))
    return keys


def unknown_override_keys(config_name: str, overrides: list[str], conf_dir: Path = CONF_DIR) -> list[tuple[str, list[str]]]:
    """The `key=value` overrides whose key the composed config lacks (Hydra would refuse them), each with
    its closest known keys: [(key, [suggestion, ...]), ...]. `+key` / `++key` / `~key`, Hydra's own keys
    and config groups are not checked; when the config groups do not compose, nothing is reported (Hydra's
    own message says why)."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra's own message
        return []
    groups = _config_groups(conf_dir)
    group_lines, checked = [], []
    for override in parsed:
        key = override.key_or_group
        if key in groups or (override.is_add() and "." not in key and "/" in key):
            group_lines.append(_first_choice(override))
        elif not (override.is_add() or override.is_delete() or override.is_force_add()
                  or key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            checked.append(key)
    if not checked:
        return []
    if GlobalHydra.instance().is_initialized():  # e.g. called inside a running Hydra app
        return []
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=group_lines)
    except Exception:
        return []
    known = config_keys(cfg)
    known_set = set(known)
    return [(key, difflib.get_close_matches(key, known, n=1, cutoff=0.6)) for key in checked if key not in known_set]


def check_override_keys(config_name: str, argv: list[str] | None = None, conf_dir: Path = CONF_DIR) -> None:
    """Before `@hydra.main` runs: an override of a key the config lacks (`data.max_lenght=256`) prints one
    line, `error: unknown setting data.max_lenght; did you mean data.max_length?`, and exits with status 2,
    before any run folder exists. `HYDRA_FULL_ERROR=1` leaves it to Hydra."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit:  # argparse's own message for a bad flag: let Hydra print it
        return
    if args.config_name or args.config_path or args.config_dir or args.help or args.hydra_help:
        return
    unknown = unknown_override_keys(config_name, args.overrides, conf_dir)
    if not unknown:
        return
    key, matches = unknown[0]
    hint = (f"did you mean {matches[0]}?" if matches
            else f"no such key in the {config_name} config (+{key}=... adds a new key)")
    others = f" (and {', '.join(k for k, _ in unknown[1:])})" if len(unknown) > 1 else ""
    print(f"error: unknown setting {key}{others}; {hint}", file=sys.stderr, flush=True)
    raise SystemExit(2)
