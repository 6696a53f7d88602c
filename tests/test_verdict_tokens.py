"""model.head=verdict_tokens: a decoder LLM's own LM-head logits of the verdict tokens (" A", " B", " tie") at the
last real token of a verdict-template row are the class logits, with LoRA, no new random head; tiny causal
Llama / Qwen2 models saved with their LM head (conftest.causal_lm_dirs)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pref_lightning.core.errors import UserError
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.tokenizers import tokenizer_files
from pref_lightning.model.backbone import load_tokenizer
from pref_lightning.model.head import last_token_pool
from pref_lightning.model.module import PreferenceModule

from .test_llm import LORA, logits_of, trainer

VERDICT = {"head": "verdict_tokens", "pooling": "last", "attn_implementation": "sdpa", "backbone_dtype": "auto"}


def cross_datamodule(tokenizer, csv, batch_size=8, **encoding):
    dm = PreferenceDataModule(train_path=str(csv), max_length=128, batch_size=batch_size, eval_batch_size=16,
                              layout="cross", template="verdict", **encoding)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def verdict_module(folder, tokenizer, dm, **kwargs):
    settings = {**VERDICT, "lr": 1e-3, "lora": LORA, "spec": dm.spec, "tokenizer_files": tokenizer_files(tokenizer),
                **kwargs}
    return PreferenceModule(backbone=str(folder), vocab_size=len(tokenizer), **settings)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, causal_lm_dirs, synthetic_csv):
    folder = causal_lm_dirs[request.param]
    tokenizer = load_tokenizer(str(folder))
    dm = cross_datamodule(tokenizer, synthetic_csv)
    return {"kind": request.param, "folder": folder, "tokenizer": tokenizer, "dm": dm,
            "batch": next(iter(dm.val_dataloader()))}


def randomise_adapter(module, seed=3):
    """lora_B starts at zero (peft): random values make the adapter change the logits visibly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in module.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def test_the_class_logits_are_the_lm_heads_logits_of_the_verdict_tokens(setup):
    tokenizer, batch = setup["tokenizer"], setup["batch"]
    # side_groups=1: one backbone call over the batch, the very computation done by hand below
    module = verdict_module(setup["folder"], tokenizer, setup["dm"], use_text_stats=False, side_groups=1).eval()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" A", " B", " tie")]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    assert module.head.token_ids.tolist() == ids
    # no new layer: the head has no parameters; only the adapter trains, the LM head stays frozen
    assert list(module.head.parameters()) == []
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    randomise_adapter(module)
    n = len(batch["labels"])
    input_ids, mask = batch["input_ids"][:n], batch["attention_mask"][:n]
    with torch.no_grad():
        logits = module(batch)  # (A, B) rows, no swap TTA
        # manual: the causal LM's decoder, its last real token, its LM head, the verdict tokens' columns
        causal = module.backbone.get_base_model()
        hidden = causal.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        manual = causal.lm_head(last_token_pool(hidden, mask))[:, ids]
        # and the model's own forward over every position (all-vocabulary logits), read at each last token
        full = module.backbone(input_ids=input_ids, attention_mask=mask).logits
        last = mask.sum(1) - 1  # right padding
        own = full[torch.arange(n), last][:, ids]
    assert logits.shape == (n, 3)
    assert torch.equal(logits, manual.float())
    assert torch.allclose(logits, own.float(), atol=1e-5)
    with module.backbone.disable_adapter(), torch.no_grad():
        assert (module(batch) - logits).abs().max() > 1e-3  # the adapter takes part
    # swap TTA: the (B, A) rows' logits are read in their own order and exchanged back
    with torch.no_grad():
        both = module.cross_logits(batch, torch.arange(2 * n))
        tta = module(batch, tta_swap=True)
    assert torch.allclose(tta, 0.5 * (both[:n] + both[n:][:, [1, 0, 2]]), atol=1e-6)


def test_text_statistics_add_an_offset_that_starts_at_zero(setup):
    batch = setup["batch"]
    module = verdict_module(setup["folder"], setup["tokenizer"], setup["dm"]).eval()
    plain = verdict_module(setup["folder"], setup["tokenizer"], setup["dm"], use_text_stats=False).eval()
    params = dict(module.head.named_parameters())
    assert set(params) == {"stats.weight", "stats.bias"} and all(not p.any() for p in params.values())
    with torch.no_grad():
        assert torch.equal(module(batch), plain(batch))  # step 0: the LM's verdict alone


def test_it_trains_loss_goes_down_on_a_fixed_batch(setup):
    torch.manual_seed(0)
    batch = next(iter(setup["dm"].train_dataloader()))
    module = verdict_module(setup["folder"], setup["tokenizer"], setup["dm"], swap_augment="none",
                            lora={**LORA, "r": 8, "alpha": 16})
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert module.backbone.get_output_embeddings().weight.grad is None  # the LM head never moved


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_checkpoint_predicts_the_same_after_a_round_trip(setup, lora, tmp_path):
    dm, batch = setup["dm"], setup["batch"]
    module = verdict_module(setup["folder"], setup["tokenizer"], dm, lora=LORA if lora else None)
    fit = trainer(2)
    fit.fit(module, dm)
    if lora:
        randomise_adapter(module)
    module.set_evaluation(temperature=1.3)
    path = tmp_path / "verdict.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    assert state["head.token_ids"].tolist() == module.head.token_ids.tolist()
    if lora:  # adapter, head and token ids only: no base weights, the LM head included
        backbone = [k for k in state if k.startswith("backbone.")]
        assert backbone and all("lora_" in k for k in backbone)
        assert path.stat().st_size < (setup["folder"] / "model.safetensors").stat().st_size
    else:  # full fine-tuning: the whole causal LM, its (frozen) LM head included
        assert any(k.endswith("lm_head.weight") for k in state)
    restored, tokenizer, spec = PreferenceModule.from_checkpoint(str(path))
    assert restored.hparams.head == "verdict_tokens" and spec.template == "verdict"
    assert len(tokenizer) == len(setup["tokenizer"])
    assert restored.temperature == pytest.approx(1.3)
    assert torch.allclose(logits_of(module, batch), logits_of(restored, batch), atol=1e-6)
    if lora:  # the adapter merged into the causal LM (its LM head kept), and fold averaging, predict the same
        from pref_lightning.model.merge import average_adapters, export_merged

        merged, _, _ = PreferenceModule.from_checkpoint(str(export_merged(path, tmp_path / "merged")))
        assert merged.hparams.lora is None and merged.hparams.head == "verdict_tokens"
        assert (logits_of(merged, batch) - logits_of(module, batch)).abs().max() < 1e-4
        averaged, _, _ = PreferenceModule.from_checkpoint(str(average_adapters([path, path], tmp_path / "mean.ckpt")))
        assert torch.allclose(logits_of(averaged, batch), logits_of(module, batch), atol=1e-6)


def test_verdict_settings_are_one_line_user_errors(causal_lm_dirs, llm_dirs, local_backbone_dir, synthetic_csv):
    from pref_lightning.model.compat import check_backbone_settings

    folder = causal_lm_dirs["llama"]
    tokenizer = load_tokenizer(str(folder))
    dm = cross_datamodule(tokenizer, synthetic_csv)
    cases = [
        ({"head": "linear"}, "model.head='linear'; choose from mlp, verdict_tokens"),
        ({"pooling": "mean"}, "model.pooling='mean' must be last"),
        ({"verdict_tokens": [" A", " B", " antidisestablishmentarianism"]},
         r"model.verdict_tokens: ' antidisestablishmentarianism' is \d+ tokens of this tokenizer"),
        ({"verdict_tokens": [" A", " B"]}, r"data.n_classes=3 needs 3 tokens"),
        ({"verdict_tokens": [" A", " A", " tie"]}, "two of them are the same token"),
        ({"anchor_head": True, "anchor": {}}, "model.anchor_head=true .* model.head=verdict_tokens has none"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            verdict_module(folder, tokenizer, dm, **kwargs)
    with pytest.raises(UserError, match="needs data.layout=cross data.template=verdict"):
        PreferenceModule(backbone=str(folder), **VERDICT, lora=LORA)  # siamese spec
    # a base model saved without its LM head (AutoModel) would read a random head: refused
    for name in ("llama", "reward"):
        with pytest.raises(UserError, match="has no LM head weights"):
            verdict_module(llm_dirs[name], load_tokenizer(str(llm_dirs[name])), dm)
    with pytest.raises(UserError, match="needs a decoder LLM with an LM head; this backbone is 'deberta-v2'"):
        verdict_module(local_backbone_dir, load_tokenizer(str(local_backbone_dir)), dm, lora=None)
    # refused before any data is read (compat.check_backbone_settings)
    cfg = OmegaConf.create({"model": {"backbone": str(folder), "head": "verdict_tokens", "pooling": "last",
                                      "verdict_tokens": [" A", " B", " antidisestablishmentarianism"]},
                            "data": {"max_length": 128, "layout": "cross", "template": "verdict"}})
    with pytest.raises(UserError, match="model.verdict_tokens"):
        check_backbone_settings(cfg)
    cfg.data.layout = "siamese"
    with pytest.raises(UserError, match="needs data.layout=cross"):
        check_backbone_settings(cfg)


@pytest.mark.slow
def test_experiment_llm_lora_with_verdict_tokens_trains_predicts_and_ensembles(causal_lm_dirs, synthetic_csv,
                                                                                tmp_path):
    import json

    import pandas as pd

    from .conftest import REPO
    from .test_end_to_end import run

    run_dir = tmp_path / "run"
    run("train.py", "experiment=llm_lora", f"model.backbone={causal_lm_dirs['llama']}", "model.head=verdict_tokens",
        "data.synthetic_rows=200", "data.max_length=128", "data.batch_size=8", "trainer.accumulate_grad_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "report=false",
        "model.lora.r=4", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_rows"] > 0 and metrics["val_log_loss"] < 2.0 and metrics["temperature"] > 0
    best = run_dir / "checkpoints" / "best.ckpt"
    hparams = torch.load(best, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["head"] == "verdict_tokens" and hparams["spec"]["template"] == "verdict"
    sub = tmp_path / "sub.csv"
    run("predict.py", f"ckpt_path={best}", f"input_path={synthetic_csv}", f"output_path={sub}", "max_tokens=auto")
    frame = pd.read_csv(sub)
    columns = ["winner_model_a", "winner_model_b", "winner_tie"]
    assert len(frame) == len(pd.read_csv(synthetic_csv)) and frame[columns].to_numpy().min() >= 0.002 - 1e-9
    mixed = tmp_path / "mixed.csv"
    run("predict.py", f"ckpt_path=[{best},{REPO / 'tests' / 'data' / 'format1_tiny.ckpt'}]",
        f"input_path={synthetic_csv}", f"output_path={mixed}")
    both = pd.read_csv(mixed)
    assert len(both) == len(frame) and (both[columns].sum(axis=1) - 1).abs().max() < 1e-6
    assert not both[columns].equals(frame[columns])
