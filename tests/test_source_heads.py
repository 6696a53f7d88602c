"""Per-source heads (`model.source_heads`, issue 21): every training source (the training file = source 0, then
each `data.sources[]` entry) trains its own output layer over the shared encoder and head trunk; source 0's
is the only one validation, prediction and checkpoints' predictions read."""

from __future__ import annotations

import json
import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from pref_lightning.core.errors import UserError
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.head import PairHead, output_layers
from pref_lightning.model.module import PreferenceModule

from .conftest import TEST_TINY

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud light".split()


def length_frame(n: int, prefix: str, start: int, longer_wins: bool, seed: int) -> pd.DataFrame:
    """Kaggle rows whose one signal is length: one answer 1-3 words, the other 8-14, on a random side; the
    longer one wins (`longer_wins`) or the shorter one does. Every file draws its prompts and answers from the
    same words and template (no row numbers in the text), so nothing in the text tells the files apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + n):
        short = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        long = " ".join(rng.choice(WORDS, int(rng.integers(8, 15))))
        long_is_a = bool(rng.integers(0, 2))
        a, b = (long, short) if long_is_a else (short, long)
        a_wins = long_is_a == longer_wins
        rows.append({"id": f"{prefix}{i}", "model_a": "x", "model_b": "y",
                     "prompt": json.dumps([f"Question about {' '.join(rng.choice(WORDS, 4))}?"]),
                     "response_a": json.dumps([a]), "response_b": json.dumps([b]),
                     "winner_model_a": int(a_wins), "winner_model_b": int(not a_wins), "winner_tie": 0})
    return pd.DataFrame(rows)


@pytest.fixture
def opposite_files(tmp_path):
    """train.csv (source 0: the longer answer wins) and flipped.csv (source 1: the shorter one wins), same
    size, disjoint prompts; extra.csv (source 2) a few more rows like source 0's."""
    length_frame(240, "t", 0, True, seed=1).to_csv(tmp_path / "train.csv", index=False)
    length_frame(240, "f", 1000, False, seed=2).to_csv(tmp_path / "flipped.csv", index=False)
    length_frame(20, "e", 5000, True, seed=3).to_csv(tmp_path / "extra.csv", index=False)
    return tmp_path


def datamodule(folder, sources, tokenizer, batch_size=32) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_path=str(folder / "train.csv"), val_fraction=0.25, split_seed=0, max_length=32,
                              batch_size=batch_size, sources=[str(folder / s) for s in sources])
    dm.fit_spec(tokenizer)
    return dm


def tiny_module(tokenizer, spec, **kwargs) -> PreferenceModule:
    torch.manual_seed(0)
    return PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                            spec=spec, **kwargs)


def test_each_row_carries_its_source_to_the_batch_in_order(opposite_files, tiny_tokenizer):
    dm = datamodule(opposite_files, ["flipped.csv", "extra.csv"], tiny_tokenizer)
    counts = [c["added_to_train"] for c in dm.data_counts["sources"]]
    n_file = len(dm.train_set) - sum(counts)
    expected = np.repeat([0, 1, 2], [n_file, *counts])
    assert dm.spec.n_sources == 3 and counts[0] > 200 and counts[1] > 10
    assert [p.source for p in dm.train_set.pairs] == expected.tolist()
    assert {p.source for p in dm.val_set.pairs} == {0}  # validation: the training file's rows only
    seen = set()
    for batch in dm.train_dataloader():  # shuffled and length-grouped: each row keeps its own source
        source = batch.get("source", torch.zeros(len(batch["labels"]), dtype=torch.long))
        assert source.tolist() == expected[batch["index"].numpy()].tolist()
        seen |= set(source.tolist())
    assert seen == {0, 1, 2}
    assert "source" not in next(iter(dm.val_dataloader()))
    # the number of sources is a data fact, not a tokenization setting: the cache key ignores it
    assert EncodingSpec(n_sources=3).tokenization_key() == EncodingSpec().tokenization_key()
    assert EncodingSpec.from_dict({k: v for k, v in EncodingSpec().to_dict().items() if k != "n_sources"}).n_sources == 1
    with pytest.raises(UserError, match="n_sources"):
        EncodingSpec(n_sources=0)


def test_a_row_trains_its_own_sources_output_layer_only(opposite_files, tiny_tokenizer):
    dm = datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer, batch_size=16)
    module = tiny_module(tiny_tokenizer, dm.spec, source_heads=True, swap_augment="none")
    head = module.head
    assert isinstance(head, PairHead) and len(head.source_outputs["mlp"]) == 1
    extra_layer, own_layer = head.source_outputs["mlp"][0], head.mlp[-1]
    assert len(output_layers(head)) == 2  # what the anchored head starts at zero: both outputs
    batch = next(iter(dm.val_dataloader()))
    for source, reached, untouched in ((1, extra_layer, own_layer), (0, own_layer, extra_layer)):
        module.zero_grad()
        routed = {**batch, "source": torch.full_like(batch["labels"], source)}
        with warnings.catch_warnings():  # self.log without a trainer
            warnings.simplefilter("ignore")
            module.training_step(routed, 0).backward()
        assert reached.weight.grad.abs().sum() > 0
        assert untouched.weight.grad is None or untouched.weight.grad.abs().sum() == 0
        assert head.mlp[0].weight.grad.abs().sum() > 0  # the shared trunk learns from every source
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.backbone.parameters())


def test_validation_and_prediction_read_source_zeros_head_only(opposite_files, tiny_tokenizer):
    dm = datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer, batch_size=16)
    batch = next(iter(dm.val_dataloader()))
    for symmetric in (False, True):
        module = tiny_module(tiny_tokenizer, dm.spec, source_heads=True, symmetric_head=symmetric).eval()
        with torch.no_grad():
            before = module(batch, tta_swap=True)
            for outputs in module.head.source_outputs.values():
                for layer in outputs:
                    layer.weight.add_(1.0)
                    layer.bias.add_(1.0)
            # a batch that carries sources (as training batches do) is still scored by source 0's head
            after = module({**batch, "source": torch.ones_like(batch["labels"])}, tta_swap=True)
            predicted = module.predict_step(batch, 0)["logits"]
        assert torch.equal(before, after) and torch.allclose(before, predicted)
        if symmetric:  # each source's win and tie layers: swapping A and B still swaps the win logits exactly
            a, b, sa, sb = module.side_vectors(batch)
            source = torch.ones_like(batch["labels"])
            with torch.no_grad():
                ab, ba = module.pair_logits(a, b, sa, sb, source), module.pair_logits(b, a, sb, sa, source)
            assert torch.allclose(ab, ba[:, [1, 0, 2]], atol=1e-5)
    # one source only (no data.sources), or source heads off: the one-head model, the same parameters
    single = datamodule(opposite_files, [], tiny_tokenizer)
    assert single.spec.n_sources == 1
    one = tiny_module(tiny_tokenizer, single.spec, source_heads=True)
    assert one.head.source_outputs is None
    assert one.state_dict().keys() == tiny_module(tiny_tokenizer, single.spec).state_dict().keys()
    assert tiny_module(tiny_tokenizer, dm.spec).head.source_outputs is None


def test_checkpoint_round_trip_predicts_the_same(tmp_path, opposite_files, tiny_tokenizer):
    from pref_lightning.data.tokenizers import tokenizer_files

    dm = datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer, batch_size=16)
    module = tiny_module(tiny_tokenizer, dm.spec, source_heads=True,
                         tokenizer_files=tokenizer_files(tiny_tokenizer, tmp_path / "tok"))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored, _, spec = PreferenceModule.from_checkpoint(str(path))
    assert spec.n_sources == 2 and restored.hparams.source_heads and restored.n_heads == 2
    assert torch.equal(restored.head.source_outputs["mlp"][0].weight, module.head.source_outputs["mlp"][0].weight)
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(module(batch, tta_swap=True), restored(batch, tta_swap=True), atol=1e-6)


def test_anchored_source_heads_start_at_the_anchor_for_every_source(opposite_files, tiny_tokenizer):
    from pref_lightning.model.anchor import fit_anchor_on

    dm = datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer, batch_size=16)
    module = tiny_module(tiny_tokenizer, dm.spec, source_heads=True, anchor_head=True,
                         anchor=fit_anchor_on(dm, l2=1.0)).eval()
    batch = next(iter(dm.val_dataloader()))
    a, b, sa, sb = module.side_vectors(batch)
    with torch.no_grad():
        offset = module.anchor(sa[:, :module.spec.n_stats], sb[:, :module.spec.n_stats])
        for source in (0, 1):
            logits = module.pair_logits(a, b, sa, sb, torch.full_like(batch["labels"], source))
            assert torch.allclose(logits, offset, atol=1e-6)


def fit_and_validate(dm: PreferenceDataModule, tokenizer, source_heads: bool) -> float:
    module = tiny_module(tokenizer, dm.spec, source_heads=source_heads, lr=1e-3, head_lr=3e-3, tta_swap=True)
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", deterministic=True)
    trainer.fit(module, dm)
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/log_loss"])


def test_opposite_labels_in_an_extra_source_no_longer_bend_the_training_files_head(opposite_files, tiny_tokenizer):
    """Source 1 labels the same signal the other way round (the shorter answer wins) and nothing in the text
    tells the sources apart: one shared head can only average the two and predicts the training file's
    validation rows near a coin toss; with a head per source, source 0's head learns the training file's rule."""
    L.seed_everything(0, verbose=False)
    shared = fit_and_validate(datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer), tiny_tokenizer, False)
    L.seed_everything(0, verbose=False)
    heads = fit_and_validate(datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer), tiny_tokenizer, True)
    assert shared > 0.6  # near ln 2 = 0.69 (no ties anywhere): the two sources cancel
    assert heads < shared - 0.3, (shared, heads)


def test_init_from_a_one_head_checkpoint_starts_the_shared_head_and_source_zero(opposite_files, tiny_tokenizer):
    from pref_lightning.model.stages import apply_init

    dm = datamodule(opposite_files, ["flipped.csv"], tiny_tokenizer, batch_size=16)
    one = tiny_module(tiny_tokenizer, dm.spec)
    torch.manual_seed(1)
    many = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16,
                            spec=dm.spec, source_heads=True)
    fresh = many.head.source_outputs["mlp"][0].weight.detach().clone()
    info = apply_init(many, {"state_dict": one.state_dict(), "path": "one.ckpt", "n_classes": 3})
    assert info["head"] == "loaded"
    assert torch.equal(many.head.mlp[-1].weight, one.head.mlp[-1].weight)
    assert torch.equal(many.head.mlp[0].weight, one.head.mlp[0].weight)
    assert torch.equal(many.head.source_outputs["mlp"][0].weight, fresh)  # no stored layer: stays as built
