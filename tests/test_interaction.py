"""model.interaction (issue 21, Synthetic): each siamese side's prompt and answer segments compared, so the head
can read "is this answer about the prompt" (which a pooled vector of the whole side hides). Opt-in, recorded in
checkpoints; the embedded default switches it on (conf/experiment/embedded.yaml)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pref_lightning.core.errors import UserError
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.model.head import check_interaction, segment_masks
from pref_lightning.model.module import PreferenceModule

from .conftest import TEST_TINY

CLS, SEP, PAD = 1, 2, 0


def test_segment_masks_find_the_prompt_answer_boundary():
    ids = torch.tensor([
        [CLS, 5, 6, SEP, 7, 8, 9, SEP, PAD, PAD],  # one turn, right padding
        [CLS, 5, SEP, 6, SEP, 7, SEP, 8, SEP, PAD],  # two turns: prompt 5 | 6, answer 7 | 8
        [PAD, PAD, CLS, 5, SEP, 7, 8, 9, 9, SEP],  # left padding
        [CLS, 5, 6, 7, SEP, PAD, PAD, PAD, PAD, PAD],  # no inner separator: all answer
    ])
    prompt, answer = segment_masks(ids, (ids != PAD).long())
    assert [ids[i][prompt[i]].tolist() for i in range(4)] == [[5, 6], [5, 6], [5], []]
    assert [ids[i][answer[i]].tolist() for i in range(4)] == [[7, 8, 9], [7, 8], [7, 8, 9, 9], [5, 6, 7]]


def test_interaction_is_opt_in_and_refused_where_it_cannot_work():
    plain = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, head_hidden=8)
    assert plain.interaction == "none"
    with pytest.raises(UserError, match="model.interaction"):
        PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, interaction="cosine")
    # the cross layout has no per-side prompt and answer: the interaction is off there (a warning says so)
    cross = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, interaction="prompt_answer",
                             spec={"layout": "cross"})
    assert cross.interaction == "none"
    with pytest.raises(UserError, match="data.layout=siamese"):
        check_interaction("prompt_answer", "cross", "mlp")


def topic_pairs(n: int, rng: np.random.Generator, topics: int = 30, words: int = 20, length: int = 10):
    """Rows where only the topic decides: a prompt of `topics` topic words, one answer on its topic and one on
    another, same length and the same share of shared filler words; label 0 when A is the on-topic one."""
    filler = np.arange(3, 13)
    first_word = 13  # ids: 0 pad, 1 [CLS], 2 [SEP], 3-12 filler, then `words` per topic

    def side(prompt_topic: int, answer_topic: int) -> list[int]:
        def text(topic: int, k: int) -> list[int]:
            topical = first_word + topic * words + rng.integers(0, words, size=k)
            return [int(t) if rng.random() < 0.6 else int(rng.choice(filler)) for t in topical]
        return [CLS, *text(prompt_topic, 6), SEP, *text(answer_topic, length), SEP]

    rows, labels = [], []
    for _ in range(n):
        t = int(rng.integers(topics))
        other = int((t + rng.integers(1, topics)) % topics)
        label = int(rng.integers(2))
        a, b = (t, other) if label == 0 else (other, t)
        rows.append((side(t, a), side(t, b)))
        labels.append(label)
    sides = [s for s, _ in rows] + [s for _, s in rows]
    width = max(len(s) for s in sides)
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sides])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": torch.tensor(labels)}, \
        first_word + topics * words


def held_out_log_loss(interaction: str, steps: int = 100) -> float:
    rng = np.random.default_rng(0)
    train, vocab = topic_pairs(2000, rng)
    test, _ = topic_pairs(400, rng)
    torch.manual_seed(0)
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=vocab, head_hidden=32,
                              use_text_stats=False, interaction=interaction, spec=EncodingSpec(n_classes=2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    n = len(train["labels"])
    for _ in range(steps):
        rows = torch.from_numpy(rng.choice(n, 32, replace=False))
        batch = {"input_ids": torch.cat([train["input_ids"][rows], train["input_ids"][rows + n]]),
                 "attention_mask": torch.cat([train["attention_mask"][rows], train["attention_mask"][rows + n]]),
                 "labels": train["labels"][rows]}
        loss = F.cross_entropy(module(batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        return float(F.cross_entropy(module(test, tta_swap=True), test["labels"]))


def test_every_trainable_parameter_has_a_learning_rate():
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, interaction="prompt_answer_embeddings")
    # every trainable parameter is the backbone's (model.lr) or a fresh one (model.head_lr): none left out
    trained = {id(p) for p in module.backbone.parameters()} | {id(p) for p in module.fresh_parameters()}
    assert all(id(p) in trained for p in module.parameters() if p.requires_grad)
    assert {id(p) for p in module.head.parameters()} <= {id(p) for p in module.fresh_parameters()}


def test_the_interaction_reads_the_topic_that_decides():
    """Only "which answer is about the prompt's topic" decides; both answers look alike otherwise. The same tiny
    encoder, the same steps: with the interaction it learns the rule, without it (what the head saw before)
    it stays near chance (ln 2 = 0.693)."""
    with_interaction = held_out_log_loss("prompt_answer_embeddings")
    without = held_out_log_loss("none")
    assert with_interaction < 0.2, with_interaction
    assert with_interaction < without - 0.2, (with_interaction, without)


def interaction_checkpoint(tmp_path, tokenizer, train_csv, interaction: str = "prompt_answer_embeddings"):
    """(module, datamodule, checkpoint path) of a tiny model with `interaction` trained 2 steps on `train_csv`."""
    from pref_lightning.data.tokenizers import tokenizer_files

    dm = PreferenceDataModule(train_path=str(train_csv), max_length=32, batch_size=8)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                              spec=dm.spec, interaction=interaction,
                              tokenizer_files=tokenizer_files(tokenizer, tmp_path / "tok"))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return module, dm, path


def test_a_checkpoint_with_the_interaction_predicts_the_same_after_reload(tmp_path, tiny_tokenizer, synthetic_csv):
    interaction = "prompt_answer_embeddings"
    module, dm, path = interaction_checkpoint(tmp_path, tiny_tokenizer, synthetic_csv, interaction)
    restored, _, _ = PreferenceModule.from_checkpoint(str(path))
    assert restored.hparams.interaction == interaction
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(module(batch), restored(batch), atol=1e-6)
    # the head reads the pooled vector and the interaction (as wide again)
    assert restored.head.norm.normalized_shape == (2 * TEST_TINY["hidden_size"],)


def on_topic_auc(module: PreferenceModule, batch: dict) -> float:
    """AUC of cos(prompt, answer) of the input embeddings: on-topic answers (label 0: side A) above off-topic."""
    from pref_lightning.model.head import mean_pool

    with torch.no_grad():
        states = module.backbone.get_input_embeddings()(batch["input_ids"])
        prompt, answer = segment_masks(batch["input_ids"], batch["attention_mask"])
        cos = F.cosine_similarity(mean_pool(states, prompt), mean_pool(states, answer), dim=-1)
    n = len(batch["labels"])
    on = torch.where(batch["labels"] == 0, cos[:n], cos[n:])
    off = torch.where(batch["labels"] == 0, cos[n:], cos[:n])
    return float((on.unsqueeze(1) > off.unsqueeze(0)).float().mean())


def test_the_relevance_loss_teaches_the_prompt_answer_match_without_labels():
    """`relevance_loss` alone (no label is read) moves the token embeddings so that a prompt is closer to an
    answer on its topic than to one on another topic, which at random initialisation it is barely."""
    from pref_lightning.model.head import relevance_loss

    rng = np.random.default_rng(0)
    train, vocab = topic_pairs(2000, rng)
    test, _ = topic_pairs(400, rng)
    torch.manual_seed(0)
    module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=vocab, head_hidden=16,
                              use_text_stats=False, interaction="prompt_answer_embeddings", relevance_weight=1.0,
                              spec=EncodingSpec(n_classes=2))
    before = on_topic_auc(module, test)
    optimizer = torch.optim.AdamW(module.backbone.get_input_embeddings().parameters(), lr=3e-3)
    n = len(train["labels"])
    for _ in range(60):
        rows = torch.from_numpy(rng.choice(n, 32, replace=False))
        ids = torch.cat([train["input_ids"][rows], train["input_ids"][rows + n]])
        mask = torch.cat([train["attention_mask"][rows], train["attention_mask"][rows + n]])
        loss = relevance_loss(module.backbone.get_input_embeddings()(ids), ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = on_topic_auc(module, test)
    assert after > 0.95 and after > before + 0.15, (before, after)


def test_the_relevance_loss_excludes_the_rows_twin_and_is_refused_without_the_interaction():
    from pref_lightning.model.head import relevance_loss

    # two rows, sides [A0, A1, B0, B1]; one-hot states: each prompt matches its own answers exactly
    ids = torch.tensor([[CLS, 5, SEP, 5, SEP], [CLS, 6, SEP, 6, SEP], [CLS, 5, SEP, 5, SEP], [CLS, 6, SEP, 7, SEP]])
    states = F.one_hot(ids, 16).float()
    loss = relevance_loss(states, ids, torch.ones_like(ids), temperature=0.1)
    # side 0's candidates: its own answer (cos 1) and side 1's and 3's (cos 0); side 2 (its twin) is left out
    expected = torch.log(1 + 2 * torch.exp(torch.tensor(-10.0)))
    sides = []
    for i, own in enumerate([1.0, 1.0, 1.0, 0.0]):
        others = [j for j in range(4) if j not in (i, (i + 2) % 4)]
        cos = [float(ids[j, 3] == ids[i, 1]) for j in others]
        sides.append(-(own / 0.1) + torch.logsumexp(torch.tensor([own / 0.1, *[c / 0.1 for c in cos]]), 0))
    assert torch.allclose(loss, torch.stack(sides).mean(), atol=1e-5)
    assert torch.allclose(sides[0], expected, atol=1e-6)
    with pytest.raises(UserError, match="model.relevance_weight"):
        PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, relevance_weight=0.5)


def test_the_relevance_temperature_reaches_the_loss_and_must_be_positive(monkeypatch):
    """model.relevance_temperature is what the training step's relevance loss divides the cosines by."""
    import pref_lightning.model.module as module_file
    from pref_lightning.model.head import relevance_loss

    rng = np.random.default_rng(0)
    batch, vocab = topic_pairs(8, rng)
    seen = []

    def spy(states, ids, mask, temperature):
        seen.append(temperature)
        return relevance_loss(states, ids, mask, temperature)

    monkeypatch.setattr(module_file, "relevance_loss", spy)
    losses = {}
    for temperature in (0.1, 0.5):
        torch.manual_seed(0)
        module = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=vocab, head_hidden=8,
                                  use_text_stats=False, interaction="prompt_answer_embeddings", relevance_weight=1.0,
                                  relevance_temperature=temperature, swap_augment="none",
                                  spec=EncodingSpec(n_classes=2))
        losses[temperature] = float(module.training_step(dict(batch), 0))
    assert seen == [0.1, 0.5] and losses[0.1] != pytest.approx(losses[0.5])
    with pytest.raises(UserError, match="model.relevance_temperature"):
        PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=50, relevance_temperature=0.0)
