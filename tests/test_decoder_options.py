"""Decoder options: model.attn_softcapping (Gemma-2's attention logit soft-capping switch)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pref_lightning.core.errors import UserError
from pref_lightning.model.backbone import build_backbone


def attention_caps(model) -> list:
    return [m.attn_logit_softcapping for m in model.modules() if hasattr(m, "attn_logit_softcapping")
            and isinstance(m, torch.nn.Module) and m is not model]


def test_gemma2_soft_capping_is_switched_off_with_false(llm_dirs, tmp_path):
    # a copy of the tiny Gemma-2 whose cap (1.0) bites on its attention scores, unlike the default 50
    capped = tmp_path / "gemma2-capped"
    shutil.copytree(llm_dirs["gemma2"], capped)
    config = json.loads((capped / "config.json").read_text())
    assert config["attn_logit_softcapping"] == 50.0
    (capped / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 1.0}))

    kept = build_backbone(str(capped), attn_implementation="eager").eval()
    off = build_backbone(str(capped), attn_implementation="eager", attn_softcapping=False).eval()
    original_off = build_backbone(str(llm_dirs["gemma2"]), attn_implementation="eager", attn_softcapping=False).eval()
    assert kept.config.attn_logit_softcapping == 1.0 and off.config.attn_logit_softcapping is None
    caps = attention_caps(off)
    assert len(caps) == kept.config.num_hidden_layers and all(c is None for c in caps)
    assert all(c == 1.0 for c in attention_caps(kept))
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        for model in (kept, off, original_off):  # large attention scores (random init makes them ~0), same in all
            for name, param in model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    param.mul_(30.0)
        hidden_kept, hidden_off, hidden_original = (m(input_ids=ids).last_hidden_state for m in (kept, off, original_off))
    assert (hidden_kept - hidden_off).abs().max() > 1e-3  # the cap changed the attention
    assert torch.equal(hidden_off, hidden_original)  # same weights, no cap: the cap value no longer matters
    # a checkpoint's stored config (prediction) keeps the switch
    rebuilt = build_backbone("x", config_dict=off.config.to_dict(), attn_implementation="eager",
                             attn_softcapping=False)
    assert rebuilt.config.attn_logit_softcapping is None and all(c is None for c in attention_caps(rebuilt))


def test_soft_capping_switch_is_refused_for_other_families(llm_dirs):
    with pytest.raises(UserError, match="model.attn_softcapping=false switches off Gemma-2's .* 'llama'"):
        build_backbone(str(llm_dirs["llama"]), attn_softcapping=False)
    with pytest.raises(UserError, match="model.attn_softcapping=false .* 'deberta-v2'"):
        build_backbone("tiny", vocab_size=50, attn_softcapping=False)
    with pytest.raises(UserError, match="model.attn_softcapping=True; choose null"):
        build_backbone(str(llm_dirs["gemma2"]), attn_softcapping=True)
    # null keeps the model's own setting
    assert build_backbone(str(llm_dirs["gemma2"])).config.attn_logit_softcapping == 50.0


def test_soft_capping_switch_reaches_the_model_and_its_checkpoint(llm_dirs, synthetic_csv, tmp_path):
    from pref_lightning.data.tokenizers import tokenizer_files
    from pref_lightning.model.backbone import load_tokenizer
    from pref_lightning.model.module import PreferenceModule

    from .test_llm import datamodule, lora_module, trainer

    tokenizer = load_tokenizer(str(llm_dirs["gemma2"]))
    dm = datamodule(tokenizer, synthetic_csv)
    module = lora_module(llm_dirs["gemma2"], tokenizer, attn_softcapping=False, spec=dm.spec,
                         tokenizer_files=tokenizer_files(tokenizer))
    assert module.backbone.config.attn_logit_softcapping is None
    assert all(c is None for c in attention_caps(module.backbone))
    fit = trainer(1)
    fit.fit(module, dm)
    path = tmp_path / "g.ckpt"
    fit.save_checkpoint(path)
    restored, _, _ = PreferenceModule.from_checkpoint(str(path))
    assert restored.hparams.attn_softcapping is False
    assert all(c is None for c in attention_caps(restored.backbone))
    with pytest.raises(UserError, match="model.attn_softcapping=false"):
        lora_module(llm_dirs["llama"], load_tokenizer(str(llm_dirs["llama"])), attn_softcapping=False)
