"""Decoder-LLM backbones with LoRA, offline: tiny random Llama / Qwen2 / Gemma-2 models built from config and
saved like hub downloads, with a byte-level BPE tokenizer trained here (pad / eos tokens, a chat template)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from pref_lightning.core.errors import MissingFileError, UserError
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.module import PreferenceModule

from . import warm
from .conftest import REPO

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def datamodule(tokenizer, csv, batch_size=8):
    dm = PreferenceDataModule(train_path=str(csv), max_length=48, batch_size=batch_size, eval_batch_size=16)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def lora_module(folder, tokenizer, **kwargs):
    settings = {"pooling": "last", "head_hidden": 16, "lr": 1e-3, "lora": LORA, "attn_implementation": "sdpa",
                "backbone_dtype": "auto", **kwargs}
    return PreferenceModule(backbone=str(folder), vocab_size=len(tokenizer), **settings)


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, accelerator="cpu", **kwargs)


def logits_of(module, batch):
    module.eval()
    with torch.no_grad():
        return module(batch, tta_swap=True)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, llm_dirs, synthetic_csv):
    """A LoRA model on the tiny Llama trained 3 steps, saved with its optimizer state; the adapter's B
    matrices are then randomised (saved as `perturbed.ckpt`) so that merging changes the weights visibly."""
    from pref_lightning.data.tokenizers import tokenizer_files
    from pref_lightning.model.backbone import load_tokenizer

    folder = llm_dirs["llama"]
    tokenizer = load_tokenizer(str(folder))
    dm = datamodule(tokenizer, synthetic_csv)
    module = lora_module(folder, tokenizer, gradient_checkpointing=True, spec=dm.spec,
                         tokenizer_files=tokenizer_files(tokenizer))
    fit = trainer(3)
    fit.fit(module, dm)
    out = tmp_path_factory.mktemp("lora_run")
    fit.save_checkpoint(out / "last.ckpt")
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in module.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    fit.save_checkpoint(out / "perturbed.ckpt", weights_only=True)
    return {"folder": folder, "tokenizer": tokenizer, "dm": dm, "module": module, "dir": out,
            "batch": next(iter(dm.val_dataloader()))}


# ---- backbones and pooling ------------------------------------------------------------------------
def test_last_token_pooling_is_exact_for_right_and_left_padding(llm_dirs):
    from pref_lightning.model.backbone import build_backbone
    from pref_lightning.model.head import pool

    model = build_backbone(str(llm_dirs["llama"]), attn_implementation="sdpa").eval()
    lengths = [6, 3, 5]
    rows = [torch.randint(3, 300, (n,)) for n in lengths]
    width = max(lengths)
    for side in ("right", "left"):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span], mask[i, span] = row, 1
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = [len(r) - 1 if side == "right" else width - 1 for r in rows]
        expected = torch.stack([hidden[i, j] for i, j in enumerate(last)])
        assert torch.equal(pool(hidden, mask, "last"), expected), side
        assert pool(hidden, mask, "last_mean").shape == (3, 64)
        # and the padding changes nothing: each row's last state is that of the row run alone
        with torch.no_grad():
            alone = torch.stack([model(input_ids=r[None]).last_hidden_state[0, -1] for r in rows])
        assert torch.allclose(pool(hidden, mask, "last"), alone, atol=1e-5), side


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_decoder_backbones_encode_pairs_and_every_adapter_weight_learns(kind, llm_dirs, synthetic_csv):
    from pref_lightning.model.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(llm_dirs[kind]))
    assert tokenizer.pad_token is not None  # llama ships none: pad = eos
    if kind == "llama":
        assert tokenizer.pad_token == tokenizer.eos_token
    batch = next(iter(datamodule(tokenizer, synthetic_csv, batch_size=4).train_dataloader()))
    module = lora_module(llm_dirs[kind], tokenizer)
    assert module.backbone.config.use_cache is False
    # sdpa where the model has it; Gemma-2 has only eager attention (its logit soft-capping)
    assert module.backbone.config._attn_implementation == ("eager" if kind == "gemma2" else "sdpa")
    assert next(module.backbone.parameters()).dtype == torch.float32  # auto: bf16 on GPUs only
    module.train()
    module.training_step(batch, 0).backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or not n.startswith("backbone.") for n in trainable)
    # lora_A gets no gradient while lora_B is still zero (peft's init); every B and head weight does
    missing = [n for n, p in trainable.items() if "lora_A" not in n and (p.grad is None or not p.grad.any())]
    assert not missing, missing[:5]


def test_reward_model_folder_gives_its_base_model_hidden_states(llm_dirs):
    from transformers import LlamaForSequenceClassification

    from pref_lightning.model.backbone import build_backbone

    backbone = build_backbone(str(llm_dirs["reward"])).eval()
    full = LlamaForSequenceClassification.from_pretrained(llm_dirs["reward"]).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        expected = full.model(input_ids=ids).last_hidden_state
        assert torch.allclose(backbone(input_ids=ids).last_hidden_state, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_packed_batches_equal_padded_ones(kind, llm_dirs, varied_csv):
    from pref_lightning.model.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(llm_dirs[kind]))
    dm = PreferenceDataModule(train_path=str(varied_csv), max_length=96, batch_size=4, length_grouped=False)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum() < mask.numel()  # the batch has padding to save
    for pooling in ("last", "mean", "last_mean"):
        padded = lora_module(llm_dirs[kind], tokenizer, pooling=pooling, packed=False).eval()
        packed = lora_module(llm_dirs[kind], tokenizer, pooling=pooling, packed=True).eval()
        packed.load_state_dict(padded.state_dict())
        with torch.no_grad():
            expected = padded.encode(ids, mask)
            assert torch.allclose(packed.encode(ids, mask), expected, atol=1e-5), pooling
            # left padding: the same rows, the same vectors
            left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
            for row, n in enumerate(mask.sum(1).tolist()):
                left_ids[row, ids.shape[1] - n:], left_mask[row, ids.shape[1] - n:] = ids[row, :n], 1
            assert torch.allclose(packed.encode(left_ids, left_mask), expected, atol=1e-5), pooling
        assert packed.last_processed_tokens == int(mask.sum())  # no padded token computed
    trained = lora_module(llm_dirs[kind], tokenizer, packed=True)
    trained.train()
    trained.training_step(batch, 0).backward()
    assert any(p.grad is not None and p.grad.any() for n, p in trained.named_parameters() if "lora_B" in n)


def test_packed_mode_is_chosen_and_checked(llm_dirs, tiny_tokenizer):
    from pref_lightning.model.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(llm_dirs["llama"]))
    assert lora_module(llm_dirs["llama"], tokenizer).uses_packed(torch.device("cpu")) is False  # auto, sdpa, CPU
    with pytest.raises(UserError, match="model.packed=true needs a decoder"):
        PreferenceModule(backbone="tiny", vocab_size=len(tiny_tokenizer), packed=True)
    with pytest.raises(UserError, match="model.packed"):
        lora_module(llm_dirs["llama"], tokenizer, packed="sometimes")


def test_reward_model_score_is_an_extra_side_feature(llm_dirs, synthetic_csv):
    from transformers import LlamaForSequenceClassification

    from pref_lightning.model.backbone import load_tokenizer
    from pref_lightning.model.lora import without_base_weights

    tokenizer = load_tokenizer(str(llm_dirs["reward"]))
    dm = datamodule(tokenizer, synthetic_csv, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    module = lora_module(llm_dirs["reward"], tokenizer, reward_score=True, spec=dm.spec).eval()
    full = LlamaForSequenceClassification.from_pretrained(llm_dirs["reward"]).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        pooled = module.encode(ids, mask)
        # the reward model's own score head at each side's last real token (LoRA's B starts at zero)
        per_token = full.score(full.model(input_ids=ids, attention_mask=mask).last_hidden_state)[..., 0]
        expected = per_token[torch.arange(len(ids)), mask.sum(1) - 1]
        assert torch.allclose(pooled[:, -1], expected, atol=1e-4) and expected.std() > 0
    module.train()
    module.training_step(batch, 0).backward()
    assert module.reward_head.weight.requires_grad is False
    assert "reward_head.weight" in without_base_weights(module.state_dict())  # travels in the checkpoint
    with pytest.raises(UserError, match="no score head"):
        lora_module(llm_dirs["llama"], tokenizer, reward_score=True, spec=dm.spec)
    with pytest.raises(UserError, match="data.layout=siamese"):
        lora_module(llm_dirs["reward"], tokenizer, reward_score=True, spec={"layout": "cross"})


def test_bad_lora_settings_are_one_line_user_errors(llm_dirs):
    from pref_lightning.model.lora import lora_settings, quantization_config

    with pytest.raises(UserError, match="unknown key 'rank'"):
        lora_settings({"rank": 8})
    with pytest.raises(UserError, match="model.lora.r="):
        lora_settings({"r": 0})
    with pytest.raises(UserError, match="model.lora.load_in="):
        lora_settings({"load_in": "2bit"})
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"model.lora.load_in=4bit .*needs a CUDA GPU") as err:
            quantization_config(lora_settings({"load_in": "4bit"}))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="model.lora needs a pretrained backbone"):
        PreferenceModule(backbone="tiny", vocab_size=100, lora=LORA)
    with pytest.raises(UserError, match="model.backbone_dtype="):
        PreferenceModule(backbone=str(llm_dirs["llama"]), backbone_dtype="fp8")


# ---- checkpoints ---------------------------------------------------------------------------------
def test_lora_checkpoint_holds_adapter_and_head_not_base_weights(lora_run):
    from pref_lightning.model.lora import base_identity

    state = torch.load(lora_run["dir"] / "last.ckpt", weights_only=True)
    keys = list(state["state_dict"])
    backbone_keys = [k for k in keys if k.startswith("backbone.")]
    assert backbone_keys and all("lora_" in k for k in backbone_keys)
    assert any(k.startswith("head.") for k in keys)
    assert state["pref_lightning"]["base_model"] == base_identity(str(lora_run["folder"]))
    stored = sum(v.numel() for k, v in state["state_dict"].items() if k.startswith("backbone."))
    base = sum(p.numel() for n, p in lora_run["module"].backbone.named_parameters() if "lora_" not in n)
    assert stored < 0.2 * base
    # the file, optimizer state included, is smaller than the base weights alone
    weights = (lora_run["folder"] / "model.safetensors").stat().st_size
    assert (lora_run["dir"] / "perturbed.ckpt").stat().st_size < weights
    assert state["optimizer_states"] and state["global_step"] == 3


def test_lora_checkpoint_predicts_the_same_and_resumes(lora_run):
    module, batch = lora_run["module"], lora_run["batch"]
    restored, tokenizer, spec = PreferenceModule.from_checkpoint(str(lora_run["dir"] / "perturbed.ckpt"))
    assert spec.max_length == 48 and len(tokenizer) == len(lora_run["tokenizer"])
    assert torch.allclose(logits_of(module, batch), logits_of(restored, batch), atol=1e-6)

    resumed = lora_module(lora_run["folder"], lora_run["tokenizer"], spec=lora_run["dm"].spec)
    fit = trainer(5)
    fit.fit(resumed, lora_run["dm"], ckpt_path=str(lora_run["dir"] / "last.ckpt"))
    assert fit.global_step == 5
    moments = fit.optimizers[0].state_dict()["state"]
    assert moments and all(int(s["step"]) == 5 for s in moments.values())  # restored, then 2 more steps


def test_a_mismatching_or_missing_base_is_refused(lora_run, llm_dirs, tmp_path):
    path = str(lora_run["dir"] / "last.ckpt")
    with pytest.raises(UserError, match="is not the base model this checkpoint was trained on.*weight files differ"):
        PreferenceModule.from_checkpoint(path, backbone=str(llm_dirs["other_llama"]))
    with pytest.raises(UserError, match="config.json and weight files differ"):
        PreferenceModule.from_checkpoint(path, backbone=str(llm_dirs["qwen2"]))
    with pytest.raises(MissingFileError, match="model.backbone=/path/to/base"):
        PreferenceModule.from_checkpoint(path, backbone=str(tmp_path / "nowhere"))
    # resuming on another base is refused too
    other = lora_module(llm_dirs["other_llama"], lora_run["tokenizer"])
    with pytest.raises(UserError, match="not the base model"):
        trainer(5).fit(other, lora_run["dm"], ckpt_path=path)


def test_merged_export_predicts_as_adapter_plus_base(lora_run, tmp_path):
    from pref_lightning.model.merge import export_merged

    module, batch = lora_run["module"], lora_run["batch"]
    with module.backbone.disable_adapter():
        base_only = logits_of(module, batch)
    adapted = logits_of(module, batch)
    assert (adapted - base_only).abs().max() > 1e-3  # the adapter matters
    ckpt = export_merged(lora_run["dir"] / "perturbed.ckpt", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    merged, _, _ = PreferenceModule.from_checkpoint(str(ckpt))
    assert merged.hparams.lora is None
    assert (logits_of(merged, batch) - adapted).abs().max() < 1e-4


def test_averaged_adapters_are_the_mean_of_the_folds(lora_run, tmp_path):
    from pref_lightning.model.merge import average_adapters

    first, second = lora_run["dir"] / "last.ckpt", lora_run["dir"] / "perturbed.ckpt"
    out = average_adapters([first, second], tmp_path / "mean.ckpt")
    a, b, mean = (torch.load(p, weights_only=True)["state_dict"] for p in (first, second, out))
    assert set(mean) == set(a)
    for key in mean:
        assert torch.allclose(mean[key], (a[key] + b[key]) / 2, atol=1e-6), key
    batch = lora_run["batch"]
    same = average_adapters([second, second], tmp_path / "same.ckpt")
    restored, _, _ = PreferenceModule.from_checkpoint(str(same))
    assert torch.allclose(logits_of(restored, batch), logits_of(lora_run["module"], batch), atol=1e-6)
    with pytest.raises(UserError, match="at least two"):
        average_adapters([first], tmp_path / "x.ckpt")


def test_average_refuses_adapters_of_different_inits(lora_run, tmp_path):
    # README's recipe for a second ensemble member is another seed: the element-wise mean of its adapter
    # and the first one's is not the mean of their updates (70% off on a tiny Llama), averaged without a word
    from pref_lightning.model.checkpoint import store_in_payload
    from pref_lightning.model.lora import init_fingerprint
    from pref_lightning.model.merge import average_adapters

    folder, tokenizer, dm = lora_run["folder"], lora_run["tokenizer"], lora_run["dm"]

    def run_of(seed, name):
        torch.manual_seed(seed)
        module = lora_module(folder, tokenizer, spec=dm.spec, augment_seed=seed,
                             tokenizer_files=lora_run["module"].tokenizer_files)
        start = init_fingerprint(module)
        fit = trainer(1)
        fit.fit(module, dm)
        assert init_fingerprint(module) != start  # training moved the adapter: the record is of the start
        path = tmp_path / f"{name}.ckpt"
        fit.save_checkpoint(path, weights_only=True)
        store_in_payload(path, init_fingerprint=start)
        return path

    one, other, again = run_of(1, "seed1"), run_of(2, "seed2"), run_of(1, "seed1_again")
    with pytest.raises(UserError, match=r"seed2.ckpt started from other initial adapter and head weights "
                                        r"\(init_fingerprint\) than .*seed1.ckpt") as info:
        average_adapters([one, other], tmp_path / "mean.ckpt")
    assert "\n" not in str(info.value)
    average_adapters([one, again], tmp_path / "same_init.ckpt")  # one seed and configuration: averaged
    # checkpoints that record no fingerprint (written before it was recorded): their seeds decide
    for path in (one, other):
        state = torch.load(path, weights_only=True)
        del state["pref_lightning"]["init_fingerprint"]
        torch.save(state, path)
    with pytest.raises(UserError, match=r"seed2.ckpt started from other seeds .*: seed=1, seed=2"):
        average_adapters([one, other], tmp_path / "mean.ckpt")


# ---- the user's commands ---------------------------------------------------------------------------
@pytest.mark.slow
def test_experiment_llm_lora_trains_and_predicts_on_cpu(llm_dirs, synthetic_csv, tmp_path):
    import json
    import sys

    import pandas as pd

    from .test_end_to_end import run

    run_dir = tmp_path / "run"
    # 800 rows, a quarter of them validation (200), 2 epochs: enough to learn measurably (a 20-row validation
    # split could not tell a model from the validation rows' own prior)
    out = run("train.py", "experiment=llm_lora", f"model.backbone={llm_dirs['llama']}", "data.synthetic_rows=800",
              "data.val_fraction=0.25", "trainer.max_epochs=2",
              "data.max_length=96", "data.batch_size=8", "trainer.accumulate_grad_batches=1",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "report=false",
              "model.lora.r=4", "model.head_hidden=16", f"hydra.run.dir={run_dir}")
    assert "LoRA: " in out and "parameters trainable" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # a model no better than the class prior, or worse than uniform, fails (measured 2026-12-04 on 2 CPU cores:
    # gain_over_uniform 0.049, gain_over_prior 0.043, no warnings)
    assert metrics["val_rows"] == 200 and not metrics["warnings"], metrics
    assert metrics["gain_over_uniform"] > 0.02 and metrics["gain_over_prior"] > 0.02, metrics
    best = run_dir / "checkpoints" / "best.ckpt"
    assert best.stat().st_size < (llm_dirs["llama"] / "model.safetensors").stat().st_size
    spec = torch.load(best, map_location="cpu", weights_only=False)["hyper_parameters"]["spec"]
    assert spec["layout"] == "cross" and spec["template"] == "verdict"  # the winners' layout

    sub = tmp_path / "sub.csv"
    run("predict.py", f"ckpt_path={best}", f"input_path={synthetic_csv}", f"output_path={sub}", "batch_size=32",
        f"model.backbone={llm_dirs['llama']}")
    assert len(pd.read_csv(sub)) == len(pd.read_csv(synthetic_csv))
    # an ensemble mixing this LLM checkpoint and a tiny DeBERTa one: each member encodes with its own
    # tokenizer and contract, the probabilities are averaged
    deberta = REPO / "tests" / "data" / "format1_tiny.ckpt"
    mixed = tmp_path / "mixed.csv"
    run("predict.py", f"ckpt_path=[{best},{deberta}]", f"input_path={synthetic_csv}", f"output_path={mixed}",
        "batch_size=32", f"model.backbone={llm_dirs['llama']}")
    frame = pd.read_csv(mixed)
    assert len(frame) == len(pd.read_csv(synthetic_csv)) and frame["id"].is_unique
    assert (frame[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1) - 1).abs().max() < 1e-6
    assert not frame[["winner_model_a", "winner_model_b", "winner_tie"]].equals(
        pd.read_csv(sub)[["winner_model_a", "winner_model_b", "winner_tie"]])
    refused = warm.run([sys.executable, "predict.py", f"ckpt_path={best}", f"input_path={synthetic_csv}",
                        f"output_path={tmp_path / 'x.csv'}", f"model.backbone={llm_dirs['other_llama']}"],
                       cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: model.backbone=")
