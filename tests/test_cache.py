"""The on-disk cache of tokenized pairs: reuse, keys, corruption, pickle-free loading, equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from pref_lightning.data import loading
from pref_lightning.data.cache import EncodedTable, LazyRecords, PairCache, encode_table, pairs_key_fields
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.pairs import STATS_FEATURES, PairEncoder
from pref_lightning.data.records import read_records


def make_dm(path, tokenizer, cache_dir=None, **kwargs):
    settings = {"val_fraction": 0.2, "max_length": 48, "batch_size": 4, **kwargs}
    dm = PreferenceDataModule(train_path=str(path), cache_dir=None if cache_dir is None else str(cache_dir),
                              **settings)
    dm.load_records()
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def assert_same_pairs(pairs, other):
    assert len(pairs) == len(other)
    for p, q in zip(pairs, other):
        assert p.index == q.index and p.label == q.label
        assert p.ids_a.dtype == q.ids_a.dtype == np.int32
        np.testing.assert_array_equal(p.ids_a, q.ids_a)
        if q.ids_b is None:
            assert p.ids_b is None
        else:
            np.testing.assert_array_equal(p.ids_b, q.ids_b)
        np.testing.assert_array_equal(p.stats_a, q.stats_a)  # bit-identical normalised statistics
        np.testing.assert_array_equal(p.stats_b, q.stats_b)


def assert_same_batches(loader, other):
    batches, other_batches = list(loader), list(other)
    assert len(batches) == len(other_batches)
    for b, c in zip(batches, other_batches):
        assert b.keys() == c.keys()
        for key in b:
            assert b[key].equal(c[key]), key


def forbid_parsing_and_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cached run parsed or tokenized again")

    monkeypatch.setattr(PairEncoder, "tokenize_turns", refuse)
    monkeypatch.setattr(loading, "read_records", refuse)


def cache_files(folder, kind):
    return sorted(folder.glob(f"{kind}-*.npz"))


def test_second_datamodule_reuses_the_cache_and_gives_identical_batches(synthetic_csv, tiny_tokenizer, tmp_path,
                                                                        monkeypatch):
    cold = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    assert len(cache_files(tmp_path, "pairs")) == 1 and len(cache_files(tmp_path, "rows")) == 1

    with monkeypatch.context() as patch:
        forbid_parsing_and_tokenizing(patch)
        warm = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
        # the split, its sizes, the prior and the reference log losses come from the cached row table
        assert len(warm.train_records) == len(cold.train_records)
        assert len(warm.val_records) == len(cold.val_records)
        assert warm.validation_reference() == cold.validation_reference()
        np.testing.assert_array_equal(warm.train_prior, cold.train_prior)
        assert warm.spec.stats_norm == cold.spec.stats_norm
        assert_same_pairs(warm.train_set.pairs, cold.train_set.pairs)
        assert_same_pairs(warm.val_set.pairs, cold.val_set.pairs)
        assert_same_batches(warm.train_dataloader(), cold.train_dataloader())
        assert_same_batches(warm.val_dataloader(), cold.val_dataloader())
        warm.prepare_data()  # what Lightning calls inside trainer.fit: nothing left to build
    assert len(cache_files(tmp_path, "pairs")) == 1

    # the lazily parsed records are the split's records, in order
    assert isinstance(warm.val_records, LazyRecords)
    assert [r.id for r in warm.val_records] == [r.id for r in cold.val_records]
    assert len(warm.train_records + warm.val_records) == 400


def test_cached_path_matches_the_uncached_path(synthetic_csv, tiny_tokenizer, tmp_path):
    plain = make_dm(synthetic_csv, tiny_tokenizer)  # cache_dir=None: the original in-memory path
    for _ in range(2):  # cold, then served from the cache
        cached = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
        assert [r.id for r in cached.train_records] == [r.id for r in plain.train_records]
        assert [r.id for r in cached.val_records] == [r.id for r in plain.val_records]
        assert cached.spec.stats_norm == plain.spec.stats_norm
        assert cached.validation_reference() == plain.validation_reference()
        # EncodedPair.index is the position within the split's own record list
        assert [p.index for p in cached.val_set.pairs] == list(range(len(plain.val_records)))
        assert_same_pairs(cached.train_set.pairs, plain.train_set.pairs)
        assert_same_pairs(cached.val_set.pairs, plain.val_set.pairs)
        assert_same_batches(cached.train_dataloader(), plain.train_dataloader())
        assert_same_batches(cached.val_dataloader(), plain.val_dataloader())


def test_cross_layout_and_explicit_validation_file(synthetic_csv, synthetic_frame, tiny_tokenizer, tmp_path):
    val_path = tmp_path / "val.csv"
    synthetic_frame.iloc[:50].assign(id=lambda f: "v" + f["id"].astype(str)).to_csv(val_path, index=False)
    kwargs = {"layout": "cross", "val_path": str(val_path)}
    plain = make_dm(synthetic_csv, tiny_tokenizer, **kwargs)
    make_dm(synthetic_csv, tiny_tokenizer, tmp_path / "cache", **kwargs)
    cached = make_dm(synthetic_csv, tiny_tokenizer, tmp_path / "cache", **kwargs)
    assert len(cached.train_records) == 400 and len(cached.val_records) == 50
    assert_same_pairs(cached.train_set.pairs, plain.train_set.pairs)
    assert_same_pairs(cached.val_set.pairs, plain.val_set.pairs)
    with np.load(cache_files(tmp_path / "cache", "pairs")[0], allow_pickle=False) as archive:
        assert "ids_b" in archive.files and "offsets_b" in archive.files  # the rows with A and B exchanged


def test_prediction_through_the_cache(synthetic_frame, tiny_tokenizer, tmp_path, monkeypatch):
    test_path = tmp_path / "test.csv"
    synthetic_frame.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]).to_csv(test_path, index=False)
    stats_norm = {"mean": [0.5] * len(STATS_FEATURES), "std": [2.0] * len(STATS_FEATURES)}

    def predict_dm(cache_dir):
        dm = PreferenceDataModule(predict_path=str(test_path), max_length=48, stats_norm=stats_norm,
                                  cache_dir=None if cache_dir is None else str(cache_dir))
        dm.attach_tokenizer(tiny_tokenizer)
        dm.prepare_data()
        dm.setup("predict")
        return dm

    plain = predict_dm(None)
    predict_dm(tmp_path / "cache")
    monkeypatch.setattr(PairEncoder, "tokenize_turns", lambda *a, **k: pytest.fail("tokenized again"))
    cached = predict_dm(tmp_path / "cache")
    assert [r.id for r in cached.predict_records] == [r.id for r in plain.predict_records]
    assert_same_pairs(cached.predict_set.pairs, plain.predict_set.pairs)
    assert all(p.label == -1 for p in cached.predict_set.pairs)


def test_key_changes_with_every_setting_the_pairs_depend_on(synthetic_csv, tiny_tokenizer, tmp_path):
    from pref_lightning.data.cache import file_sha256
    from pref_lightning.data.tokenizers import cached_trained_tokenizer, tokenizer_from_files

    file_hash = file_sha256(synthetic_csv)
    base = pairs_key_fields(file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48)), True)
    cache = PairCache(tmp_path)

    def path(fields):
        return cache.pairs_path(fields)

    # the same settings (and the same tokenizer, however it was loaded) give the same key
    from pref_lightning.data.tokenizers import tokenizer_files

    reloaded = tokenizer_from_files(tokenizer_files(tiny_tokenizer), tmp_path / "reloaded")
    assert path(pairs_key_fields(file_hash, PairEncoder(reloaded, EncodingSpec(max_length=48)), True)) == path(base)

    other_tokenizer = cached_trained_tokenizer(["alpha beta gamma delta", "epsilon zeta eta theta"] * 20, 40,
                                               tmp_path / "tok")
    changed_file = tmp_path / "changed.csv"
    changed_file.write_bytes(synthetic_csv.read_bytes() + b"\n")
    variants = {
        "max_length": pairs_key_fields(file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=64)), True),
        "prompt_fraction": pairs_key_fields(file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48, prompt_fraction=0.4)), True),
        "layout": pairs_key_fields(file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48, layout="cross")), True),
        "naive_truncation": pairs_key_fields(
            file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48, layout="cross", naive_truncation=True)), True),
        "tokenizer": pairs_key_fields(file_hash, PairEncoder(other_tokenizer, EncodingSpec(max_length=48)), True),
        "file content": pairs_key_fields(file_sha256(changed_file), PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48)), True),
        "labels required": pairs_key_fields(file_hash, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48)), False),
    }
    paths = {name: path(fields) for name, fields in variants.items()}
    assert len(set(paths.values()) | {path(base)}) == len(variants) + 1, paths
    assert base["format"] >= 1 and base["file_sha256"] == file_hash


def test_changed_settings_build_a_new_cache_file(synthetic_csv, tiny_tokenizer, tmp_path):
    make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    make_dm(synthetic_csv, tiny_tokenizer, tmp_path, max_length=64)
    make_dm(synthetic_csv, tiny_tokenizer, tmp_path, layout="cross")
    assert len(cache_files(tmp_path, "pairs")) == 3
    assert len(cache_files(tmp_path, "rows")) == 1  # the split inputs depend on the file only


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_cache_files_are_rebuilt(synthetic_csv, tiny_tokenizer, tmp_path, damage, caplog):
    reference = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    for path in cache_files(tmp_path, "pairs") + cache_files(tmp_path, "rows"):
        data = path.read_bytes()
        path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a zip" * 100,
                          "empty": b""}[damage])
    with caplog.at_level("WARNING", logger="pref_lightning.data.cache"):
        rebuilt = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2  # rows and pairs files
    assert_same_pairs(rebuilt.train_set.pairs, reference.train_set.pairs)
    assert_same_pairs(rebuilt.val_set.pairs, reference.val_set.pairs)
    # the rebuilt files are whole again and serve the next run
    again = make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    assert_same_pairs(again.val_set.pairs, reference.val_set.pairs)
    assert len(cache_files(tmp_path, "pairs")) == 1


def test_cache_files_load_without_pickle_and_hold_raw_statistics(synthetic_csv, tiny_tokenizer, tmp_path):
    make_dm(synthetic_csv, tiny_tokenizer, tmp_path)
    (pairs_file,) = cache_files(tmp_path, "pairs")
    (rows_file,) = cache_files(tmp_path, "rows")
    with np.load(rows_file, allow_pickle=False) as archive:
        assert {"prompt_key_bytes", "prompt_key_offsets", "labels", "oracle"} <= set(archive.files)
        assert all(archive[name].dtype != object for name in archive.files)
    with np.load(pairs_file, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    assert all(a.dtype != object for a in arrays.values())
    assert arrays["ids_a"].dtype == np.int32 and arrays["ids_b"].dtype == np.int32
    assert arrays["offsets_a"].shape == (401,) and arrays["offsets_a"][-1] == len(arrays["ids_a"])
    assert arrays["stats_a"].dtype == np.float32 and arrays["stats_a"].shape == (400, len(STATS_FEATURES))
    np.testing.assert_array_equal(arrays["rows"], np.arange(400))
    # file order, raw (un-normalised) statistics, exactly what the encoder gives
    records = read_records(synthetic_csv)
    direct = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48)).encode(records[:5])
    table = EncodedTable.from_arrays(arrays)
    for row, pair in enumerate(direct):
        np.testing.assert_array_equal(table.ids_a[table.offsets_a[row]:table.offsets_a[row + 1]], pair.ids_a)
        np.testing.assert_array_equal(table.stats_b[row], pair.stats_b)
        assert table.labels[row] == records[row].label


def test_block_encoding_matches_one_call(synthetic_csv, tiny_tokenizer):
    records = read_records(synthetic_csv)
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48))
    whole = EncodedTable.from_pairs(encoder.encode(records))
    blocks = encode_table(encoder, records, block_rows=37)
    for name, value in whole.arrays().items():
        np.testing.assert_array_equal(blocks.arrays()[name], value, err_msg=name)


def test_unwritable_cache_dir_falls_back_to_memory(synthetic_csv, tiny_tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    dm = make_dm(synthetic_csv, tiny_tokenizer, blocker / "cache")
    assert len(dm.train_set) + len(dm.val_set) == 400


def test_the_row_tables_key_follows_the_split_key_code(tmp_path, monkeypatch):
    """The code fingerprint takes modules and functions by reference (a function: its whole module), and the
    row table's covers folds.prompt_key, whose keys it stores: a change there serves no stale split keys."""
    import importlib
    import sys

    from pref_lightning.data import cache, folds

    assert folds.prompt_key in cache.ROWS_CODE
    module_file = tmp_path / "split_keys_probe.py"
    module_file.write_text("def key(record):\n    return record.prompt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("split_keys_probe")
    try:
        before = cache._code_fingerprint(probe.key)
        assert before == cache._code_fingerprint(probe)
        module_file.write_text("def key(record):\n    return record.prompt.lower()\n")
        cache._code_fingerprint.cache_clear()
        assert cache._code_fingerprint(probe.key) != before
    finally:
        cache._code_fingerprint.cache_clear()
        sys.modules.pop("split_keys_probe", None)
