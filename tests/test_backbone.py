import pytest
import torch

from pref_lightning.data.tokenizers import cached_trained_tokenizer, tokenizer_files, tokenizer_from_files
from pref_lightning.model.backbone import build_backbone, load_tokenizer

from .conftest import minilm_installed


def test_trained_tokenizer_encodes_real_pieces_not_unk(tiny_tokenizer, synthetic_frame):
    text = "Here is a short guide about the topic with a few examples."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3
    unk = tiny_tokenizer.unk_token_id
    assert sum(i == unk for i in ids) == 0
    assert tiny_tokenizer.decode(ids) == text  # lossless round trip
    assert len(set(ids)) > 3


def test_special_tokens_have_deberta_ids(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == 0
    assert tiny_tokenizer.cls_token_id == 1
    assert tiny_tokenizer.sep_token_id == 2
    assert tiny_tokenizer.unk_token_id == 3


def test_cache_reuses_folder(tmp_path):
    texts = ["alpha beta gamma delta"] * 20 + ["photosynthesis makes sugar from light"] * 20
    first = cached_trained_tokenizer(texts, 60, tmp_path)
    folders = list((tmp_path / "tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer_config.json").exists()
    mtime = (folders[0] / "tokenizer.json").stat().st_mtime_ns
    second = cached_trained_tokenizer(texts, 60, tmp_path)
    assert (folders[0] / "tokenizer.json").stat().st_mtime_ns == mtime  # not retrained
    assert first("alpha gamma")["input_ids"] == second("alpha gamma")["input_ids"]


def test_tokenizer_files_round_trip(tmp_path, tiny_tokenizer):
    files = tokenizer_files(tiny_tokenizer, tmp_path / "saved")
    assert "tokenizer_config.json" in files and "tokenizer.json" in files
    restored = tokenizer_from_files(files, tmp_path / "restored")
    text = "the quick answer, with code and a list"
    assert restored(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_local_folder_backbone_and_tokenizer(local_backbone_dir, tiny_tokenizer):
    tokenizer = load_tokenizer(str(local_backbone_dir))
    text = "a real sentence about the topic"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    model = build_backbone(str(local_backbone_dir), dropout=0.0)
    assert model.config.hidden_size == 32 and model.config.hidden_dropout_prob == 0.0
    out = model(input_ids=torch.tensor([[1, 5, 6, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert out.last_hidden_state.shape == (1, 4, 32)


def test_folder_without_tokenizer_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(str(tmp_path))


def test_tiny_backbone_from_config_is_deberta_v3_shaped():
    model = build_backbone("tiny", vocab_size=500, tiny_overrides={"hidden_size": 32, "num_attention_heads": 2,
                                                                  "num_hidden_layers": 1, "intermediate_size": 64})
    assert model.config.model_type == "deberta-v2"
    assert model.config.relative_attention and model.config.pos_att_type == ["p2c", "c2p"]
    assert model.get_input_embeddings().num_embeddings == 500
    rebuilt = build_backbone("ignored", config_dict=model.config.to_dict())
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_tiny_overrides_from_hydra_switch_to_absolute_positions():
    """The embedded default's form (conf/model/tiny_embedded.yaml): Hydra hands lists as ListConfig, which
    transformers' config validation rejects unless turned into plain lists."""
    from omegaconf import OmegaConf

    overrides = OmegaConf.create({"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                                  "intermediate_size": 64, "relative_attention": False,
                                  "position_biased_input": True, "pos_att_type": []})
    model = build_backbone("tiny", vocab_size=500, tiny_overrides=overrides)
    assert not model.config.relative_attention and model.config.pos_att_type == []
    assert model.embeddings.position_embeddings is not None  # absolute positions instead
    ids = torch.randint(5, 500, (2, 12))
    moved = model(input_ids=ids).last_hidden_state
    swapped = model(input_ids=ids.flip(1)).last_hidden_state.flip(1)
    assert not torch.allclose(moved, swapped, atol=1e-4)  # word order still reaches the encoder


def test_every_parameter_of_the_embedded_backbone_gets_a_gradient():
    """DDP stalls on a parameter no loss reaches (the encoder's LayerNorm of relative embeddings that the
    absolute-position embedded model does not have): conf/model/tiny_embedded.yaml's backbone has none."""
    from omegaconf import OmegaConf

    from .conftest import REPO

    overrides = OmegaConf.load(REPO / "conf" / "model" / "tiny_embedded.yaml").tiny_config
    overrides = OmegaConf.merge(overrides, {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})
    model = build_backbone("tiny", vocab_size=500, tiny_overrides=overrides)
    ids = torch.randint(5, 500, (3, 10))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.square().mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_tiny_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        build_backbone("tiny")


def test_tokenizer_training_is_the_same_in_every_process():
    """Same texts -> the same vocabulary in a fresh process (runs with the same seed must match)."""
    import subprocess
    import sys

    code = ("from pref_lightning.data.tokenizers import train_tokenizer;"
            "t = train_tokenizer(['the cat sat on the mat', 'a dog ran far away'] * 20 + ['zebra quilt'], 60);"
            "print(t.backend_tokenizer.to_str())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(3)}
    assert len(outputs) == 1


BACKBONES = ["tiny", "deberta_folder", "bert_folder",
             pytest.param("minilm", marks=pytest.mark.skipif(not minilm_installed(), reason="minilm extra absent"))]


@pytest.mark.parametrize("kind", BACKBONES)
def test_every_backbone_parameter_gets_a_gradient_from_the_pooled_output(kind, request, tiny_tokenizer):
    """DDP (find_unused_parameters=False) fails on a parameter outside the loss: a BERT-style pooler the
    head never reads must not be built, neither from a folder nor when rebuilt from a checkpoint's config."""
    from pref_lightning.model.head import pool

    if kind == "tiny":
        model = build_backbone("tiny", vocab_size=len(tiny_tokenizer), tiny_overrides={
            "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64})
    else:
        source = {"deberta_folder": "local_backbone_dir", "bert_folder": "local_bert_dir"}.get(kind)
        model = build_backbone(str(request.getfixturevalue(source)) if source else kind, dropout=0.0)
    rebuilt = build_backbone("ignored", config_dict=model.config.to_dict())
    for encoder in (model, rebuilt):
        assert not [name for name, _ in encoder.named_parameters() if "pooler" in name]
        ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
        mask = (ids != 0).long()
        pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean").square().sum().backward()
        unused = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.any()]
        assert not unused, f"{kind}: no gradient for {unused[:5]}"


def test_checkpoint_weights_of_a_dropped_pooler_are_ignored():
    from pref_lightning.model.checkpoint import without_unused_weights

    module = torch.nn.Module()
    module.backbone = torch.nn.Linear(2, 2)
    state = {**module.state_dict(), "backbone.pooler.dense.weight": torch.zeros(1), "head.x": torch.zeros(1)}
    assert set(without_unused_weights(state, module)) == {"backbone.weight", "backbone.bias", "head.x"}
