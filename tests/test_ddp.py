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

import pandas as pd
import pytest

from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.data.records import ORACLE_COLUMNS

from .conftest import REPO, TEST_TINY_OVERRIDES, minilm_installed

pytestmark = pytest.mark.slow
# the Rich bar is forced: in a subprocess (no terminal) the default would be the log-line progress, and the
# Rich bar's metric sync on rank 0 is what hung DDP (issue 11)
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "callbacks.rich_progress_bar.style=rich"]
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


def test_ddp_prediction_of_one_row_with_the_default_progress_bar(ddp_run, tmp_path, synthetic_frame):
    """One row, two ranks: the empty rank scores a padding copy; the row is written exactly once."""
    run_dir, _ = ddp_run
    one = synthetic_frame.drop(columns=list(CLASS_COLUMNS) + list(ORACLE_COLUMNS)).iloc[:1]
    one.to_csv(tmp_path / "one_row.csv", index=False)
    run_ranks("predict.py", f"ckpt_path={run_dir}", f"input_path={tmp_path}/one_row.csv",
              f"output_path={tmp_path}/sub.csv", f"hydra.run.dir={tmp_path}/p", "trainer.accelerator=cpu",
              "trainer.devices=2", "trainer.strategy=ddp")
    sub = pd.read_csv(tmp_path / "sub.csv", dtype={"id": str})
    assert sub["id"].tolist() == one["id"].astype(str).tolist()
    assert abs(sub[list(CLASS_COLUMNS)].to_numpy().sum() - 1) < 1e-5


def test_ddp_sigterm_with_the_default_progress_bar(tmp_path):
    run_dir = tmp_path / "killed"
    out = run_ranks("train.py", *DDP, *SMALL, "data.synthetic_rows=240", f"hydra.run.dir={run_dir}",
                    "+callbacks.kill._target_=tests.signals.SigtermAtStep", "+callbacks.kill.step=3", returncode=143)
    assert "resume with" in out and (run_dir / "checkpoints" / "last.ckpt").is_file()
    leftovers = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


MODEL_CONFIGS = [("deberta_v3_small", "local_backbone_dir", 1), ("minilm", "local_bert_dir", 3),
                 ("llm_lora", "local_llama_dir", 3),
                 pytest.param("minilm", None, 1, marks=pytest.mark.skipif(not minilm_installed(),
                                                                          reason="the minilm extra is not installed"))]


@pytest.mark.parametrize("config, folder, val_rows", MODEL_CONFIGS)
def test_ddp_trains_every_shipped_model_config(config, folder, val_rows, request, tmp_path, synthetic_csv,
                                               synthetic_frame):
    """Each conf/model file under DDP past its second step (a parameter outside the loss fails there).
    deberta_v3_small and minilm are stood in for by tiny local folders of their families (random init,
    the BERT one with its pooler); the real MiniLM runs when its extra is installed.
    The validation file is small: 1 row (fewer than the ranks) or 3 (one rank gets a padding copy of
    its row, which would move the mean if it were counted: fp32 checks the metric to float noise)."""
    synthetic_frame.iloc[:val_rows].to_csv(tmp_path / "val.csv", index=False)
    backbone = [f"model.backbone={request.getfixturevalue(folder)}"] if folder else []
    run_dir = tmp_path / "run"
    run_ranks("train.py", *DDP, f"model={config}", *backbone, f"data.train_path={synthetic_csv}",
              f"data.val_path={tmp_path}/val.csv", "data.max_length=48", "data.batch_size=8", "trainer.precision=32",
              "trainer.limit_train_batches=3", "model.head_hidden=16", "trainer.enable_model_summary=false",
              "report=false", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_rows"] == val_rows and metrics["epochs"] == 1
    # the metric of trainer.validate (torchmetrics across ranks, padding on one) == the log loss of the
    # gathered real rows' logits (each once)
    assert metrics["val_log_loss"] == pytest.approx(metrics["val_log_loss_uncalibrated"], abs=1e-5)
