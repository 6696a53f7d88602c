"""benchmarks/scale_on_paper.py: its counts agree with the libraries, its estimates with its own formulas."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark

scale = load_benchmark("scale_on_paper")


def test_parameter_counts_are_the_published_sizes():
    # Gemma-2-9B's backbone: 9.24B (embeddings tied); DeBERTa-v3-large: 434M with its 128k-token embedding matrix
    assert scale.shape("gemma-2-9b")["params"] == pytest.approx(9.24e9, rel=2e-3)
    assert scale.shape("deberta-v3-large")["params"] == pytest.approx(434e6, rel=1e-2)
    llama = scale.shape("llama-3-70b")
    assert llama["params"] == pytest.approx(69.5e9, rel=1e-2)  # 70.6B with the untied 1.05B LM head
    assert llama["kv_dim"] == 8 * 128 and llama["q_dim"] == 8192


def test_lora_count_is_what_peft_adds(monkeypatch):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModel, LlamaConfig

    values = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 96, "vocab_size": 500}
    monkeypatch.setitem(scale.MODELS, "tiny-llama", ("llama", values))
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModel.from_config(LlamaConfig(**values)),
                                peft.LoraConfig(r=scale.LORA_R, target_modules="all-linear"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert scale.shape("tiny-llama")["lora_params"] == trainable


def test_estimates_follow_the_memory_model():
    gemma = scale.shape("gemma-2-9b")
    recipe = {"mode": "lora", "layout": "cross", "rows": 4, "gpus": 1, "checkpointing": True, "mfu": 0.35}
    lora = scale.estimate(recipe, gemma, 1024)
    qlora = scale.estimate({**recipe, "mode": "qlora"}, gemma, 1024)
    # the frozen base in bf16 is 2 bytes a parameter; NF4 stores the layers' Linear weights in ~0.52
    assert lora["states_gib"] == pytest.approx((2 * gemma["params"] + 16 * gemma["lora_params"]) / 2**30, abs=0.1)
    assert qlora["states_gib"] < 0.5 * lora["states_gib"]
    assert qlora["activations_gib"] == lora["activations_gib"]
    # with checkpointing, activations are nearly linear in length; twice the rows, twice the activations
    longer = scale.estimate(recipe, gemma, 2048)
    assert 2.0 <= longer["activations_gib"] / lora["activations_gib"] < 2.2
    assert scale.estimate({**recipe, "rows": 8}, gemma, 1024)["activations_gib"] == pytest.approx(
        2 * lora["activations_gib"], abs=0.1)
    # FSDP: four GPUs hold a quarter of the full fine-tuning states each (plus two gathered layers) and train
    # the same rows in a quarter of the wall time at the same utilisation
    full = scale.estimate({**recipe, "mode": "full"}, gemma, 1024)
    fsdp = scale.estimate({**recipe, "mode": "fsdp_full", "gpus": 4}, gemma, 1024)
    assert fsdp["states_gib"] == pytest.approx(full["states_gib"] / 4, rel=0.05)
    assert fsdp["hours_per_10k_rows"] == pytest.approx(full["hours_per_10k_rows"] / 4, rel=0.01)
    assert not full["fits"] and fsdp["fits"]


def test_the_published_table_is_the_script_output(tmp_path):
    out = tmp_path / "scale.json"
    assert scale.main(["--out", str(out)]) == 0
    import json

    fresh, stored = json.loads(out.read_text()), json.loads(scale.RESULTS.read_text())
    assert fresh["recipes"] == stored["recipes"] and fresh["models"] == stored["models"]
