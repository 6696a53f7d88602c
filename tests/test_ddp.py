"""Two-rank CPU DDP (gloo) as a user runs it: default callbacks and the default Rich progress bar.

Every run is a subprocess in its own process group with a deadline: a hang (ranks waiting in
different collectives) kills every rank and fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import REPO, TEST_TINY_OVERRIDES

pytestmark = pytest.mark.slow
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# small and fast, but the default callbacks, loggers and progress bar (no trainer.enable_progress_bar=false)
SMALL = ["data.max_length=48", "data.batch_size=16", "trainer.enable_model_summary=false", *TEST_TINY_OVERRIDES]
DEADLINE = 240  # s; a healthy run here takes well under a minute


def run_ranks(script, *overrides, timeout=DEADLINE, returncode=0):
    """`python script overrides` (it launches the other rank itself); returns stdout + stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, script, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched share the group
        out, err = proc.communicate()
        pytest.fail(f"{script} hung: no exit within {timeout} s (every rank killed)\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == returncode, f"{script} exited {proc.returncode}:\n{out[-3000:]}\n{err[-5000:]}"
    return out + err


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_bar")
    out = run_ranks("train.py", *DDP, *SMALL, "data.synthetic_rows=240", f"hydra.run.dir={run_dir}")
    return run_dir, out


def test_ddp_trains_and_validates_with_the_default_progress_bar(ddp_run):
    run_dir, out = ddp_run
    assert "All distributed processes registered" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_rows"] + metrics["val_rows"] == 240
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_ddp_sigterm_with_the_default_progress_bar(tmp_path):
    run_dir = tmp_path / "killed"
    out = run_ranks("train.py", *DDP, *SMALL, "data.synthetic_rows=240", f"hydra.run.dir={run_dir}",
                    "+callbacks.kill._target_=tests.signals.SigtermAtStep", "+callbacks.kill.step=3", returncode=143)
    assert "resume with" in out and (run_dir / "checkpoints" / "last.ckpt").is_file()
    leftovers = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
