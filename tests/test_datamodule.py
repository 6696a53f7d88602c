import numpy as np
import pytest
import torch

from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.folds import grouped_split, prompt_key
from pref_lightning.data.records import PairRecord


def records_with_shared_prompts(n_groups=40, per_group=3):
    out = []
    for g in range(n_groups):
        for k in range(per_group):
            prompt = [f"Question number {g}?"] if k % 2 == 0 else [f"question   NUMBER {g}?"]  # same, normalised
            out.append(PairRecord(f"{g}-{k}", prompt, ["a"], ["b"], label=k % 3))
    return out


def test_grouped_split_never_straddles_a_prompt():
    records = records_with_shared_prompts()
    train, val = grouped_split(records, 0.2, seed=1)
    assert sorted(train + val) == list(range(len(records)))
    train_keys = {prompt_key(records[i]) for i in train}
    val_keys = {prompt_key(records[i]) for i in val}
    assert not train_keys & val_keys
    assert 0.2 * len(records) <= len(val) <= 0.2 * len(records) + 3


def test_grouped_split_is_seeded_and_order_free():
    records = records_with_shared_prompts()
    _, val1 = grouped_split(records, 0.2, seed=1)
    _, val2 = grouped_split(list(reversed(records)), 0.2, seed=1)
    n = len(records)
    assert sorted(records[i].id for i in val1) == sorted(records[n - 1 - i].id for i in val2)
    _, other = grouped_split(records, 0.2, seed=2)
    assert other != val1


def test_split_rejects_impossible_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        grouped_split(records_with_shared_prompts(), 1.0, seed=0)
    one_prompt = [PairRecord(str(i), ["same"], ["a"], ["b"], label=0) for i in range(5)]
    with pytest.raises(ValueError, match="1 distinct prompts"):
        grouped_split(one_prompt, 0.5, seed=0)


def test_datamodule_from_csv_builds_batches(synthetic_csv, tiny_tokenizer):
    dm = PreferenceDataModule(train_path=str(synthetic_csv), val_fraction=0.2, max_length=48, batch_size=4)
    dm.load_records()
    assert len(dm.train_records) + len(dm.val_records) == 400
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 48
    assert batch["labels"].shape == (4,)
    reference = dm.validation_reference()
    assert 0.9 < reference["prior_log_loss"] < 1.2
    assert reference["oracle_log_loss"] < reference["prior_log_loss"]
    assert np.isclose(dm.train_prior.sum(), 1.0)


def test_setup_without_tokenizer_is_a_clear_error(synthetic_csv):
    dm = PreferenceDataModule(train_path=str(synthetic_csv))
    with pytest.raises(RuntimeError, match="attach_tokenizer"):
        dm.setup("fit")


def test_embedded_synthetic_source(tiny_tokenizer):
    dm = PreferenceDataModule(train_path=None, synthetic_rows=200, synthetic_seed=5, val_fraction=0.25)
    dm.load_records()
    assert len(dm.train_records) + len(dm.val_records) == 200
    assert all(r.oracle is not None for r in dm.val_records)
    assert "synthetic" in dm.source_name


def test_prediction_file_without_rows_is_a_clear_error(tmp_path, tiny_tokenizer, synthetic_frame):
    path = tmp_path / "empty.csv"
    synthetic_frame.iloc[:0].to_csv(path, index=False)
    dm = PreferenceDataModule(predict_path=str(path), stats_norm={"mean": [0.0] * 13, "std": [1.0] * 13})
    dm.attach_tokenizer(tiny_tokenizer)
    with pytest.raises(ValueError, match="no rows"):  # the reader says so, naming the file
        dm.setup("predict")


def test_evaluation_loaders_give_every_rank_the_same_batches_and_each_row_once(tiny_tokenizer, synthetic_csv):
    """A validation split smaller than the ranks: the empty ranks get a padding batch (length-grouped
    or not), the real rows are each seen once."""
    from types import SimpleNamespace

    for grouped in (True, False):
        dm = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32, length_grouped=grouped)
        dm.attach_tokenizer(tiny_tokenizer)
        dm.setup("fit")
        dm.val_set.pairs = dm.val_set.pairs[:2]
        seen, batches = [], set()
        for rank in range(3):
            dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
            loader = list(dm.val_dataloader())
            batches.add(len(loader))
            for batch in loader:
                valid = batch.get("valid", torch.ones(len(batch["index"]), dtype=torch.bool))
                seen += batch["index"][valid].tolist()
        assert batches == {1} and sorted(seen) == [0, 1]


def test_token_budget_training_loader_resumes_mid_epoch(tiny_tokenizer, varied_csv):
    """data.max_tokens: a loader restored at (epoch 1, 3 batches) yields the uninterrupted run's remaining batches."""

    def loader(position=None):
        dm = PreferenceDataModule(train_path=str(varied_csv), max_length=48, max_tokens=800)
        dm.attach_tokenizer(tiny_tokenizer)
        dm.setup("fit")
        if position is not None:
            dm.load_state_dict({"train_position": position})
        return dm, dm.train_dataloader()

    dm, straight = loader()
    straight.batch_sampler.set_epoch(1)
    expected = [b["index"].tolist() for b in straight]
    assert len({len(b) for b in expected}) > 1 and len(expected) == len(straight)
    assert all(dm.train_set.pairs[i] is not None for b in expected for i in b)
    _, resumed = loader({"epoch": 1, "batches": 3})
    assert [b["index"].tolist() for b in resumed] == expected[3:]


@pytest.mark.parametrize("cache", [False, True])
def test_predict_loader_gives_the_datamodules_rows_batches_and_order(tiny_tokenizer, synthetic_csv, tmp_path, cache):
    """Prediction's own loader (no training-shaped object) reads, encodes and batches a file exactly as the
    datamodule's predict path does, with or without the on-disk cache."""
    from pref_lightning.data.loaders import predict_loader

    trained = PreferenceDataModule(train_path=str(synthetic_csv), max_length=32)
    spec = trained.fit_spec(tiny_tokenizer)
    cache_dir = str(tmp_path / "cache") if cache else None
    dm = PreferenceDataModule(predict_path=str(synthetic_csv), spec=spec, eval_batch_size=8, eval_max_tokens=300,
                              cache_dir=cache_dir)
    dm.attach_tokenizer(tiny_tokenizer)
    dm.setup("predict")
    records, loader = predict_loader(synthetic_csv, spec, tiny_tokenizer, 8, 300, cache_dir=cache_dir)
    assert [r.id for r in records] == [r.id for r in dm.predict_records]
    expected = list(dm.predict_dataloader())
    got = list(loader)
    assert len(got) == len(expected) > 1
    for batch, other in zip(got, expected):
        assert batch.keys() == other.keys() and all(batch[k].equal(other[k]) for k in batch)
    assert sorted(torch.cat([b["index"] for b in got]).tolist()) == list(range(len(records)))
