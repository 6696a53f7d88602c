import numpy as np
import pytest

from pref_lightning.core.errors import UserError
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.folds import assign_folds, fold_split, prompt_key
from pref_lightning.data.records import label_array, read_records


@pytest.fixture
def repeated_prompts_csv(synthetic_frame, tmp_path):
    """The synthetic rows with a quarter of the prompts asked again (as arena prompts are)."""
    frame = synthetic_frame.copy()
    frame.loc[frame.index[1::4], "prompt"] = frame["prompt"].iloc[0::4].to_numpy()[: len(frame.index[1::4])]
    path = tmp_path / "repeated.csv"
    frame.to_csv(path, index=False)
    return path


def test_folds_keep_prompts_together_and_balance_classes(repeated_prompts_csv):
    records = read_records(repeated_prompts_csv)
    keys, labels = [prompt_key(r) for r in records], label_array(records)
    folds = assign_folds(keys, labels, 5, seed=3)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    by_key: dict[str, set[int]] = {}
    for key, fold in zip(keys, folds):
        by_key.setdefault(key, set()).add(int(fold))
    assert all(len(f) == 1 for f in by_key.values())  # no prompt straddles two folds
    shared = [k for k in by_key if keys.count(k) > 1]
    assert shared, "the fixture must have repeated prompts for this test to mean anything"
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= max(3, 0.05 * len(folds))
    prior = np.bincount(labels, minlength=3) / len(labels)
    for f in range(5):  # stratified: each fold's class shares near the overall shares
        share = np.bincount(labels[folds == f], minlength=3) / (folds == f).sum()
        assert np.abs(share - prior).max() < 0.05


def test_fold_assignment_is_seeded_and_independent_of_row_order():
    rng = np.random.default_rng(0)
    keys = [f"prompt {i % 37}" for i in range(300)]
    labels = rng.integers(0, 3, 300)
    folds = assign_folds(keys, labels, 4, seed=1)
    perm = rng.permutation(300)
    permuted = assign_folds([keys[i] for i in perm], labels[perm], 4, seed=1)
    assert (permuted == folds[perm]).all()
    assert not (assign_folds(keys, labels, 4, seed=2) == folds).all()
    train, val = fold_split(folds, 2)
    assert sorted(train + val) == list(range(300)) and all(folds[i] == 2 for i in val)


def test_fold_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(["a", "b"], np.array([0, 1]), 1, seed=0)
    with pytest.raises(ValueError, match="from 2 distinct prompts"):
        assign_folds(["a", "b", "a"], np.array([0, 1, 2]), 3, seed=0)
    with pytest.raises(ValueError, match="data.fold=5 outside 0..4"):
        fold_split(np.arange(5), 5)
    with pytest.raises(ValueError, match="exclude each other"):
        PreferenceDataModule(train_path="x.csv", val_path="y.csv", n_folds=5)


@pytest.mark.parametrize("cached", [False, True])
def test_datamodule_folds_partition_the_file(repeated_prompts_csv, tmp_path, cached):
    dms = [PreferenceDataModule(train_path=str(repeated_prompts_csv), n_folds=3, fold=k, split_seed=7,
                                cache_dir=str(tmp_path / "cache") if cached else None) for k in range(3)]
    for dm in dms:
        dm.load_records()
    val_ids = [set(dm.val_ids) for dm in dms]
    table = dms[0].fold_table()
    assert len(table) == len(set(table["id"])) == sum(len(v) for v in val_ids)
    assert set().union(*val_ids) == set(table["id"])
    for k, dm in enumerate(dms):
        assert val_ids[k] == set(table["id"][table["fold"] == k])
        assert not val_ids[k] & {r.id for r in dm.train_records}


def test_a_fold_without_n_folds_is_refused():
    # data.fold=0,1 swept without data.n_folds trained two identical val_fraction runs listed as two folds
    with pytest.raises(UserError, match=r"data.fold=1 needs data.n_folds") as info:
        PreferenceDataModule(train_path="x.csv", fold=1)
    assert "\n" not in str(info.value)
    assert PreferenceDataModule(train_path="x.csv", fold=0).n_folds is None  # the default stays valid
