"""benchmarks/gpu_check.py: exits 0 without a GPU, and its commands work (run on the CPU with --smoke)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    result = run("--work", str(tmp_path), "--results", str(tmp_path / "r.json"))
    assert result.returncode == 0 and "no CUDA device" in result.stdout
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_smoke_runs_train_validate_calibrate_predict_with_every_stage_probed(tmp_path):
    # 30 steps on 600 rows (60 validation rows): enough to learn measurably, so that the gains below can be asserted
    result = run("--smoke", "--steps", "30", "--rows", "600", "--batch-size", "8", "--predict-rows", "40",
                 "--max-length", "48", "--vocab-size", "300", "--work", str(tmp_path), "--results",
                 str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (smoke,) = json.loads((tmp_path / "r.json").read_text())["results"]
    stages = {s["stage"]: s for s in smoke["stages"]}
    assert set(stages) == {"fit", "validate", "predict"} and smoke["ok"]
    assert all(s["devices"] == ["cpu"] and s["tokens"] > 0 and s["seconds"] > 0 for s in stages.values())
    assert stages["predict"]["rows"] == 40 and stages["fit"]["non_finite_losses"] == 0
    # a model no better than the class prior, or worse than uniform, fails (measured 2026-12-04 on 2 CPU cores:
    # gain_over_uniform 0.093, gain_over_prior 0.101, no warnings)
    assert smoke["gain_over_uniform"] > 0.05 and smoke["gain_over_prior"] > 0.05 and smoke["warnings"] == [], smoke
    assert smoke["temperature"] > 0
    assert "| smoke | 32-true | 1 | fit |" in result.stdout
