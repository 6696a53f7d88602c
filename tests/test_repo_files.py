"""Files of the repository itself: what git ignores."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("path", ["runs/my_run/checkpoints/best.ckpt", "outputs/2026-01-01/12-00-00/metrics.json",
                                  "multirun/2026-01-01/12-00-00/0/metrics.json"])
def test_run_folders_are_ignored_by_git(path):
    # README's `hydra.run.dir=runs/...` and Hydra's default folders hold checkpoints of hundreds of MB
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO)
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"
