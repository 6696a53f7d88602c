"""The offline Kaggle kit (`python -m pref_lightning.kaggle pack`): what it ships, its notebook, and (slow) that it
installs with `--no-index` into an environment that has only torch and predicts a file outside the repository."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest

from pref_lightning import kaggle
from pref_lightning.core.errors import UserError

from .conftest import REPO

PREMOVE = REPO / "tests" / "data" / "premove"
DEBERTA, LORA = PREMOVE / "format2_deberta.ckpt", PREMOVE / "format2_lora.ckpt"
INPUT = REPO / "tests" / "data" / "format1_input.csv"


def test_the_kit_ships_what_torch_does_not_bring_pinned_to_the_installed_versions():
    ship = kaggle.packages_to_ship()
    torch_side = kaggle.requirement_closure(["torch"])
    assert "torch" not in ship and not set(ship) & set(torch_side)
    for needed in ("hydra-core", "omegaconf", "lightning", "transformers", "torchmetrics", "pandas", "tokenizers"):
        assert ship[needed] == metadata.version(needed), needed
    assert "pandas" not in kaggle.packages_to_ship(skip=["pandas"])


def test_pack_without_wheels_writes_checkpoints_manifest_and_the_notebook_cells(tmp_path):
    out = tmp_path / "kit"
    manifest = json.loads(kaggle.pack(out, [str(DEBERTA), str(LORA)], dataset="my-kit", wheels=False).read_text())
    assert [c["needs_base_model"] for c in manifest["checkpoints"]] == [False, True]
    for entry in manifest["checkpoints"]:
        assert (out / entry["file"]).read_bytes() == Path(entry["source"]).read_bytes()
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}" and manifest["wheels"] == []
    cells = ["".join(c["source"]) for c in json.loads((out / "notebook.ipynb").read_text())["cells"]]
    code = "\n".join(cells)
    assert "!pip install --no-index --find-links /kaggle/input/my-kit/wheels pref-lightning" in code
    assert f"ckpt_path=[/kaggle/input/my-kit/{manifest['checkpoints'][0]['file']}," in code
    assert "model.backbone=/kaggle/input/BASE_MODEL_FOLDER" in code  # the LoRA member needs its base
    assert "trainer.devices=2 trainer.strategy=ddp" in code


def test_pack_refuses_a_used_folder_a_missing_checkpoint_and_a_bad_argument(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        kaggle.pack(tmp_path / "used", [str(DEBERTA)], wheels=False)
    with pytest.raises(UserError, match="nothing.ckpt: no such file"):
        kaggle.pack(tmp_path / "new", [str(tmp_path / "nothing.ckpt")], wheels=False)
    assert not (tmp_path / "new").exists()
    assert kaggle.ckpt_arguments(["ckpt_path=[a,b]", "ckpt_path=c"]) == ["a", "b", "c"]
    with pytest.raises(UserError, match="expected ckpt_path="):
        kaggle.ckpt_arguments(["checkpoint=a"])


def torch_only_site(folder: Path) -> Path:
    """A folder of links to torch and the distributions torch requires (files and dist-info), nothing else:
    what a Kaggle image provides beneath the kit."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in kaggle.requirement_closure(kaggle.PROVIDED):
        dist = metadata.distribution(name)
        roots = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        base = Path(str(dist.locate_file("")))
        for root in roots:
            if (base / root).exists() and not (folder / root).exists() and root != "__pycache__":
                (folder / root).symlink_to(base / root)
    return folder


@pytest.mark.slow
def test_the_kit_installs_offline_where_only_torch_is_and_predicts_outside_the_repository(tmp_path):
    out = tmp_path / "kit"
    done = subprocess.run([sys.executable, "-m", "pref_lightning.kaggle", "pack", str(out), f"ckpt_path={DEBERTA}"],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "upload the folder as the Kaggle dataset" in done.stdout
    wheels = json.loads((out / "kit.json").read_text())["wheels"]
    assert any(w.startswith("pref_lightning-") for w in wheels) and not any(w.startswith("torch-") for w in wheels)

    env_dir = tmp_path / "image"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the venv's own old setuptools would shadow the one torch requires (an image has torch's)
    for own in Path(site).glob("*"):
        if own.name.startswith(("setuptools", "_distutils_hack", "distutils-precedence", "pkg_resources")):
            shutil.rmtree(own) if own.is_dir() else own.unlink()
    (Path(site) / "image_torch.pth").write_text(str(torch_only_site(tmp_path / "torch_site")) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["PIP_NO_INDEX"] = "1"  # as offline as a Kaggle notebook
    check = subprocess.run([str(python), "-c", "import torch\ntry:\n import hydra\nexcept ImportError: print('bare')"],
                           capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert check.stdout.strip() == "bare", check.stderr  # torch, and not the rest, before the kit
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(out / "wheels"),
                              "pref-lightning"], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    work = tmp_path / "notebook"
    work.mkdir()
    test_csv = work / "test.csv"
    test_csv.write_bytes(INPUT.read_bytes())
    predict = subprocess.run([str(python), "-m", "pref_lightning.predict", f"ckpt_path={out / 'checkpoints'}/"
                              f"{json.loads((out / 'kit.json').read_text())['checkpoints'][0]['file'].split('/')[-1]}",
                              f"input_path={test_csv}", f"output_path={work / 'submission.csv'}"],
                             capture_output=True, text=True, env={**clean, "HOME": str(tmp_path)}, cwd=work, timeout=600)
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    got = pd.read_csv(work / "submission.csv", dtype={"id": str})
    expected = pd.read_csv(PREMOVE / "format2_deberta_expected.csv", dtype={"id": str})
    assert got["id"].tolist() == expected["id"].tolist()
    assert (got.iloc[:, 1:] - expected.iloc[:, 1:]).abs().to_numpy().max() < 1e-6
