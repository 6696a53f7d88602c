"""`trainer=fsdp`: FSDP2 (`fully_shard`) under Lightning's ModelParallelStrategy, on 2 CPU ranks (gloo).

FSDP is data parallel: rank r of 2 steps on training batches r, r + 2, ... (the sampler deals them out) and
the sharded gradients are the mean of the two ranks' gradients. A single process with
`trainer.accumulate_grad_batches=2` steps on the same two batches with the same mean gradient, so with
nothing random per rank (swap augmentation and dropout off) the two runs take the same steps and end with
the same weights up to float rounding (the reduce-scatter sums in another order than accumulation does).
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.model.sharding import mixed_precision_policy, transformer_blocks

from .test_cli import compose_cfg
from .test_ddp import run_ranks

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "trainer.accumulate_grad_batches=1"]
# 256 rows, a quarter validation: 192 training rows = 24 batches of 8 = 12 optimizer steps either way;
# nothing random per rank or per batch index (swap coins are drawn per (batch, rank); LoRA dropout)
SMALL = ["experiment=llm_lora", "data.synthetic_rows=256", "data.val_fraction=0.25", "data.max_length=96",
         "data.batch_size=8", "data.eval_batch_size=16", "model.head_hidden=16", "model.swap_augment=none",
         "model.lora.dropout=0.0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "report=false"]
# the same global batch in one process: two batches of 8 per optimizer step
SINGLE = ["trainer=cpu", "trainer.precision=32-true", "trainer.accumulate_grad_batches=2"]


# ---- what is sharded, and the settings refused before any data is read ----------------------------------
@pytest.mark.parametrize("kind, block", [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                                         ("gemma2", "Gemma2DecoderLayer")])
def test_each_decoder_layer_is_a_block_also_under_peft(kind, block, llm_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(llm_dirs[kind])
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == [block] * model.config.num_hidden_layers
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert [id(b) for b in transformer_blocks(wrapped)] == [id(b) for b in blocks]


def test_encoder_layers_are_the_blocks_of_deberta_and_bert(local_backbone_dir, local_bert_dir):
    from transformers import AutoModel

    for folder, block in ((local_backbone_dir, "DebertaV2Layer"), (local_bert_dir, "BertLayer")):
        model = AutoModel.from_pretrained(folder)
        assert [type(b).__name__ for b in transformer_blocks(model)] == [block] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="no ModuleList named layers or layer"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_mixed_precision_only_for_bf16_mixed_on_a_gpu():
    policy = mixed_precision_policy("bf16-mixed", "cuda")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("bf16-mixed", "cpu") is None
    assert mixed_precision_policy("32-true", "cuda") is None


def test_fsdp_config_and_its_refusals(monkeypatch):
    from pref_lightning.model.compat import check_hardware

    cfg = compose_cfg("train", ["trainer=fsdp"])
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert cfg.trainer.strategy.save_distributed_checkpoint is False  # best.ckpt: one file
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1
    assert check_hardware(compose_cfg("train", FSDP)) == {}
    with pytest.raises(UserError, match="trainer=fsdp with trainer.devices=1: one process has nothing to shard"):
        check_hardware(compose_cfg("train", [*FSDP, "trainer.devices=1"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="trainer.precision=16-mixed with trainer=fsdp.*no float16 gradient scaler"):
        check_hardware(compose_cfg("train", ["trainer=fsdp", "trainer.precision=16-mixed"]))
    assert check_hardware(compose_cfg("train", ["trainer=fsdp", "trainer.precision=bf16-mixed"])) == {}


# ---- two CPU ranks ------------------------------------------------------------------------------------
def global_step(run_dir) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, llm_dirs):
    """Full fine-tuning of the tiny Llama (no LoRA): sharded on 2 ranks, and in one process."""
    root = tmp_path_factory.mktemp("fsdp_full")
    common = [*SMALL, f"model.backbone={llm_dirs['llama']}", "model.lora=null", "model.lr=1e-3"]
    out = run_ranks("train.py", *FSDP, *common, f"hydra.run.dir={root}/fsdp")
    run_ranks("train.py", *SINGLE, *common, f"hydra.run.dir={root}/single")
    return root, out


@pytest.mark.slow
def test_fsdp_full_fine_tuning_matches_one_process(full_runs, tmp_path, synthetic_frame):
    root, out = full_runs
    assert "FSDP2: 2 x FSDPLlamaDecoderLayer sharded one by one" in out
    # the memory FSDP saves: each of the 2 ranks keeps about half of the parameters (and of their gradients and
    # AdamW moments); dim-0 shards are padded to equal sizes, so a rank may hold a little more than half
    shares = [int(held) / int(total) for held, total in re.findall(r"this rank holds (\d+) of (\d+) parameters", out)]
    assert shares and all(0.45 <= share <= 0.55 for share in shares), shares
    fsdp, single = (json.loads((root / name / "metrics.json").read_text()) for name in ("fsdp", "single"))
    assert fsdp["train_rows"] == single["train_rows"] == 192 and fsdp["val_rows"] == 64
    assert global_step(root / "fsdp") == global_step(root / "single") == 12
    # same steps on the same global batches: the same model up to float rounding (measured 2026-12-04 on 2 CPU
    # cores: weights within 9e-7, validation log loss equal to 1e-9, submission probabilities within 6e-8)
    for key in ("val_log_loss", "val_log_loss_uncalibrated", "temperature"):
        assert fsdp[key] == pytest.approx(single[key], abs=1e-5), key
    # best.ckpt is one file holding every weight; predict.py loads it in one process and scores every row
    best = root / "fsdp" / "checkpoints" / "best.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    one = torch.load(root / "single" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert sorted(state) == sorted(one)
    worst = max(float((state[k].float() - one[k].float()).abs().max()) for k in state)
    assert worst < 1e-5, worst
    rows = synthetic_frame.drop(columns=[c for c in synthetic_frame.columns if c.startswith(("winner_", "oracle_"))])
    rows.iloc[:50].to_csv(tmp_path / "test.csv", index=False)
    for name in ("fsdp", "single"):
        run_ranks("predict.py", f"ckpt_path={root / name / 'checkpoints' / 'best.ckpt'}",
                  f"input_path={tmp_path}/test.csv", f"output_path={tmp_path}/{name}.csv",
                  f"hydra.run.dir={tmp_path}/p_{name}")
    a, b = (pd.read_csv(tmp_path / f"{name}.csv") for name in ("fsdp", "single"))
    assert len(a) == 50 and a["id"].tolist() == b["id"].tolist()
    assert (a[list(CLASS_COLUMNS)] - b[list(CLASS_COLUMNS)]).abs().to_numpy().max() < 1e-5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llm_dirs):
    run_dir = tmp_path_factory.mktemp("fsdp_lora") / "run"
    out = run_ranks("train.py", *FSDP, *SMALL, f"model.backbone={llm_dirs['llama']}", "model.lora.r=4",
                    f"hydra.run.dir={run_dir}")
    return run_dir, out


@pytest.mark.slow
def test_fsdp_lora_checkpoint_holds_no_base_weights_and_resumes(lora_run, llm_dirs):
    run_dir, out = lora_run
    assert "LoRA: " in out and "FSDP2: 2 x FSDPLlamaDecoderLayer" in out
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    backbone = [k for k in best["state_dict"] if k.startswith("backbone.")]
    assert backbone and all("lora_" in k for k in backbone)  # gathered on rank 0, base weights dropped
    assert any(k.startswith("head.") for k in best["state_dict"])
    assert best["pref_lightning"]["base_model"]["folder"] == str(llm_dirs["llama"].resolve())
    assert global_step(run_dir) == 12
    # resume: the last.ckpt of the sharded run (optimizer state gathered on rank 0) continues for a second epoch
    run_ranks("train.py", *FSDP, *SMALL, f"model.backbone={llm_dirs['llama']}", "model.lora.r=4",
              "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 24 and last["epoch"] == 1
    moments = last["optimizer_states"][0]["state"]
    assert moments and all(int(s["step"]) == 24 for s in moments.values())
