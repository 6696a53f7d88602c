"""An offline Kaggle kit: one folder to upload as a Kaggle dataset, from which a notebook without internet
installs this package and predicts.

    python -m pref_lightning.kaggle pack OUT ckpt_path=RUN/checkpoints/best.ckpt [ckpt_path=RUN2 ...]
        [--skip pandas,pyarrow] [--dataset NAME]

OUT holds `wheels/` (this project, built from its source, and every package it needs at run time that torch
does not bring, pinned to the versions installed here: a Kaggle image has torch, so torch and its own
dependencies are left out), `checkpoints/` (copies of the checkpoints: a run folder gives its
`checkpoints/best.ckpt`), `kit.json` (what is inside: versions, Python and platform the wheels were built
for, checkpoint hashes, the commit) and `notebook.ipynb` with the exact cells: `pip install --no-index
--find-links`, then `python -m pref_lightning.predict` on one GPU or split over two (DDP). Wheels are built or
downloaded for this machine's Python and platform: pack on a machine that matches the Kaggle image (Linux
x86_64, the image's Python minor version); the notebook's first cell checks it and says so in one line.
Packing needs the package registry (it downloads wheels); the notebook needs nothing online.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from pref_lightning.core import cli
from pref_lightning.core.cli import say
from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.core.runinfo import git_commit, utc_now
from pref_lightning.model.checkpoint import CHECKPOINT_KEY, load_checkpoint
from pref_lightning.predict.ensemble import checkpoint_paths

PROJECT = "pref-lightning"
PROVIDED = ("torch",)  # in every Kaggle GPU image; with everything torch itself requires
REPO = Path(__file__).resolve().parents[1]
KAGGLE_INPUT = "/kaggle/input"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots: Iterable[str]) -> dict[str, str]:
    """{normalised name: installed version} of `roots` and everything they require at run time, following
    the extras a requirement asks for (`fsspec[http]` brings aiohttp), as installed in this environment.
    Raises UserError when a required package is not installed."""
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    stack = [(name, "") for name in roots]
    while stack:
        name, extra = stack.pop()
        key = canonical(name)
        if (key, extra) in done:
            continue
        done.add((key, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise UserError(f"kaggle pack: {name} is required but not installed here; install the project "
                            f"first (pip install -e .)") from None
        found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                stack += [(requirement.name, "")] + [(requirement.name, e) for e in requirement.extras]
    return found


def packages_to_ship(skip: Sequence[str] = ()) -> dict[str, str]:
    """The run-time closure of this project less that of `PROVIDED` and the `skip` names: {name: version}."""
    provided = requirement_closure(PROVIDED)
    skipped = {canonical(s) for s in skip}
    return {name: version for name, version in sorted(requirement_closure([PROJECT]).items())
            if name not in provided and name not in skipped and name != canonical(PROJECT)}


def _pip(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"kaggle pack: pip {' '.join(args[:2])} ... failed: {tail[0]}")


def build_wheels(folder: Path, packages: dict[str, str], source: Path = REPO) -> list[str]:
    """This project's wheel (built from `source`) and one wheel per `packages` entry (name==version: a
    published wheel when there is one, else built from the sdist, as pip wheel does) in `folder`; returns the
    file names."""
    folder.mkdir(parents=True, exist_ok=True)
    _pip(["wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(folder), str(source)])
    pins = [f"{name}=={version}" for name, version in packages.items()]
    if pins:
        _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder), *pins])
    return sorted(p.name for p in folder.glob("*.whl"))


def copy_checkpoints(paths: Sequence[str], folder: Path) -> list[dict[str, Any]]:
    """Copies of the checkpoints (a run folder: its checkpoints/best.ckpt) in `folder`, numbered so that two
    runs' best.ckpt do not collide; each described by name, source, size and whether it needs a base model
    (a LoRA checkpoint holds no base weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    described = []
    for i, path in enumerate(checkpoint_paths(list(paths))):
        source = Path(path)
        checkpoint = load_checkpoint(source)  # refuses what is not a checkpoint of this project, naming it
        target = folder / f"{i}_{source.parent.parent.name if source.name == 'best.ckpt' else source.stem}.ckpt"
        shutil.copyfile(source, target)
        base = checkpoint.get(CHECKPOINT_KEY, {}).get("base_model")
        described.append({"file": f"checkpoints/{target.name}", "source": str(source.resolve()),
                          "bytes": target.stat().st_size, "needs_base_model": bool(base),
                          "base_model": base.get("name") if base else None})
    return described


def notebook(dataset: str, checkpoints: list[dict[str, Any]], python: str) -> dict[str, Any]:
    """The Kaggle notebook (nbformat 4) that installs the kit offline and writes submission.csv."""
    kit = f"{KAGGLE_INPUT}/{dataset}"
    ckpts = ",".join(f"{kit}/{c['file']}" for c in checkpoints)
    base = ""
    if any(c["needs_base_model"] for c in checkpoints):
        base = f" model.backbone={KAGGLE_INPUT}/BASE_MODEL_FOLDER"
    predict = (f"!python -m pref_lightning.predict ckpt_path=[{ckpts}]{base} "
               f"input_path={KAGGLE_INPUT}/lmsys-chatbot-arena/test.csv output_path=/kaggle/working/submission.csv")
    cells = [
        ("markdown", f"# pref-lightning offline prediction\nAdd the dataset `{dataset}` (this kit) and the "
                     "competition data as inputs; internet off."
                     + ("\nA LoRA checkpoint holds no base weights: add the base model as an input too and set "
                        "`BASE_MODEL_FOLDER` below." if base else "")),
        ("code", f"import sys\nassert sys.version.startswith('{python}'), "
                 f"f'the kit was packed for Python {python}, this image has {{sys.version.split()[0]}}: pack it again "
                 "on a matching machine'"),
        ("code", f"!pip install --no-index --find-links {kit}/wheels {PROJECT}"),
        ("markdown", "One GPU:"),
        ("code", predict + " trainer.accelerator=gpu"),
        ("markdown", "Or both GPUs of a 2xT4 session: each process predicts half of the rows, rank 0 writes "
                     "the one submission (DDP):"),
        ("code", "# " + predict[1:] + " trainer.accelerator=gpu trainer.devices=2 trainer.strategy=ddp"),
    ]
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {"language_info": {"name": "python"}},
            "cells": [{"cell_type": kind, "metadata": {}, "source": text,
                       **({"outputs": [], "execution_count": None} if kind == "code" else {})}
                      for kind, text in cells]}


def pack(out: str | Path, ckpt_paths: Sequence[str], skip: Sequence[str] = (), dataset: str | None = None,
         wheels: bool = True) -> Path:
    """Write the kit to `out` (see the module docstring); returns the path of its kit.json. Raises UserError
    for a missing or foreign checkpoint, a non-empty `out`, or a failed wheel build."""
    if not ckpt_paths:
        raise UserError("kaggle pack: give at least one ckpt_path=CHECKPOINT (or a run folder)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"kaggle pack: {out} is not empty; choose a new folder")
    for path in ckpt_paths:
        if not Path(path).exists():
            raise MissingFileError(f"kaggle pack: ckpt_path={path}: no such file or run folder")
    out.mkdir(parents=True, exist_ok=True)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    checkpoints = copy_checkpoints(ckpt_paths, out / "checkpoints")
    packages = packages_to_ship(skip)
    files = build_wheels(out / "wheels", packages) if wheels else []
    dataset = dataset or out.resolve().name
    (out / "notebook.ipynb").write_text(json.dumps(notebook(dataset, checkpoints, python), indent=1))
    manifest = {"created": utc_now(), "commit": git_commit(), "python": python, "platform": sysconfig.get_platform(),
                "machine": platform.machine(), "dataset": dataset, "provided_by_image": list(PROVIDED),
                "skipped": list(skip), "packages": packages, "wheels": files, "checkpoints": checkpoints}
    target = out / "kit.json"
    target.write_text(json.dumps(manifest, indent=1))
    return target


def ckpt_arguments(values: Sequence[str]) -> list[str]:
    """`ckpt_path=A`, `ckpt_path=[A,B]` (repeatable) -> [A, B]; anything else is refused in one line."""
    paths = []
    for value in values:
        key, sep, rest = value.partition("=")
        if key != "ckpt_path" or not sep or not rest.strip("[]"):
            raise UserError(f"kaggle pack: {value!r}: expected ckpt_path=CHECKPOINT or ckpt_path=[A,B]")
        paths += [p.strip() for p in rest.strip("[]").split(",") if p.strip()]
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pref_lightning.kaggle", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="write an offline kit folder to upload as a Kaggle dataset")
    packer.add_argument("out")
    packer.add_argument("checkpoints", nargs="+", metavar="ckpt_path=...")
    packer.add_argument("--skip", default="", help="comma-separated packages the image already has, left out")
    packer.add_argument("--dataset", default=None, help="the Kaggle dataset name (default: OUT's folder name)")
    packer.add_argument("--no-wheels", action="store_true", help="checkpoints and notebook only")
    args = parser.parse_args(argv)
    skip = [s for s in args.skip.split(",") if s]
    manifest = cli.run(lambda: pack(args.out, ckpt_arguments(args.checkpoints), skip, args.dataset,
                                    wheels=not args.no_wheels))
    kit = json.loads(manifest.read_text())
    say(f"kit in {manifest.parent}: {len(kit['wheels'])} wheels, {len(kit['checkpoints'])} "
          f"checkpoint(s), notebook.ipynb (Python {kit['python']}, {kit['platform']}); upload the folder as the "
          f"Kaggle dataset {kit['dataset']!r}")


if __name__ == "__main__":
    main()
