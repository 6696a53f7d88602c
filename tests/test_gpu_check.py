"""benchmarks/gpu_check.py: exits 0 without a GPU, and its commands work (run on the CPU with --smoke)."""

import json
import os
import sys

import pytest
import torch

from . import warm
from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return warm.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    result = run("--work", str(tmp_path), "--results", str(tmp_path / "r.json"))
    assert result.returncode == 0 and "no CUDA device" in result.stdout
    assert not (tmp_path / "r.json").exists()


SMOKE_LLM = ("--llm-steps", "3", "--llm-rows", "120", "--llm-batch-size", "4", "--llm-max-length", "128",
             "--llm-vocab-size", "400")


@pytest.mark.slow
def test_smoke_runs_train_validate_calibrate_predict_with_every_stage_probed(tmp_path):
    # 30 steps on 600 rows (60 validation rows): enough to learn measurably, so that the gains below can be asserted
    result = run("--smoke", "--steps", "30", "--rows", "600", "--batch-size", "8", "--predict-rows", "40",
                 "--max-length", "48", "--vocab-size", "300", *SMOKE_LLM, "--work", str(tmp_path), "--results",
                 str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((tmp_path / "r.json").read_text())
    runs = {r["run"]: r for r in written["results"]}
    assert list(runs) == ["smoke", "llm_mlp", "llm_verdict"]
    smoke = runs["smoke"]
    stages = {s["stage"]: s for s in smoke["stages"]}
    assert set(stages) == {"fit", "validate", "predict"} and smoke["ok"]
    assert all(s["devices"] == ["cpu"] and s["tokens"] > 0 and s["seconds"] > 0 for s in stages.values())
    assert stages["predict"]["rows"] == 40 and stages["fit"]["non_finite_losses"] == 0
    # a model no better than the class prior, or worse than uniform, fails (measured 2026-12-04 on 2 CPU cores:
    # gain_over_uniform 0.093, gain_over_prior 0.101, no warnings)
    assert smoke["gain_over_uniform"] > 0.05 and smoke["gain_over_prior"] > 0.05 and smoke["warnings"] == [], smoke
    assert smoke["temperature"] > 0
    assert "| smoke | 32-true | 1 | fit |" in result.stdout
    # the decoder-LLM stages: a tiny Qwen2-shaped causal LM with LoRA, the default head and verdict tokens,
    # predicted with token budgets (max_tokens=auto)
    assert written["machine"]["llm"]["shape"] == "tiny (--smoke)" and written["machine"]["llm"]["parameters"] > 0
    for name, head in (("llm_mlp", "mlp"), ("llm_verdict", "verdict_tokens")):
        llm = runs[name]
        stages = {s["stage"]: s for s in llm["stages"]}
        assert llm["ok"] and llm["head"] == head and set(stages) == {"fit", "validate", "predict"}, llm
        assert stages["fit"]["batches"] == 3 and stages["predict"]["rows"] == 40
        assert all(s["tokens"] > 0 and s["tokens_per_s"] > 0 for s in stages.values())
        assert "parameters trainable" in llm["lora"] and "adapter" in llm["lora"]
        assert 0 < llm["val_log_loss"] < 2
        assert (tmp_path / f"{name}.submission.csv").is_file()


def test_results_are_merged_into_the_file_not_replaced(tmp_path):
    from .conftest import load_benchmark

    gpu_check = load_benchmark("gpu_check")
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"machine": {"gpu": "H200", "steps": 200}, "results": [
        {"run": "bf16", "ok": True}, {"run": "llm_mlp", "ok": False}]}))
    merged = gpu_check.merged(path, {"gpu": "H200", "llm": {"steps": 60}},
                              [{"run": "llm_mlp", "ok": True}, {"run": "llm_verdict", "ok": True}])
    assert merged["machine"] == {"gpu": "H200", "steps": 200, "llm": {"steps": 60}}
    assert merged["results"] == [{"run": "bf16", "ok": True}, {"run": "llm_mlp", "ok": True},
                                 {"run": "llm_verdict", "ok": True}]
    assert gpu_check.merged(tmp_path / "none.json", {"gpu": "x"}, [{"run": "a"}]) == {
        "machine": {"gpu": "x"}, "results": [{"run": "a"}]}
