"""Hostile input: property-based tests of the readers, the tokenizer path and prediction.

Prediction must never crash and must give exactly one valid row per input id, in input order, whatever
the cells hold (lone surrogates, RTL and zero-width characters, JSON lists with null / numbers / nested
lists, non-JSON text, empty cells, CRLF and quotes, cells of 200k characters, 100 turns, mismatched turn
counts, identical answers). Training must refuse malformed labels and columns with an error naming the
file, the row id and the column (or skip them with `on_bad_rows=skip`).
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pref_lightning.core.metrics import CLASS_COLUMNS, softmax
from pref_lightning.data.adapters import read_any, read_source
from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.datamodule import PreferenceDataModule
from pref_lightning.data.pairs import STATS_FEATURES, PairEncoder
from pref_lightning.data.records import DataError, parse_turns, read_records
from pref_lightning.data.submission import submission_frame, winner_frame
from pref_lightning.model.module import PreferenceModule
from pref_lightning.predict.prediction import gather_predictions

from . import warm
from .conftest import REPO, TEST_TINY

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
MAX_LENGTH = 32
NEUTRAL_NORM = {"mean": [0.0] * len(STATS_FEATURES), "std": [1.0] * len(STATS_FEATURES)}

HOSTILE = ["\ud800", "\udfff", "\ud83d", "\ude00", "\u202e", "\u200f", "\u061c", "\u200b", "\u200d", "\ufeff",
           "\r\n", "\r", "\n", '"', '""', "'", ",", ";", "\\", "\t", "😀", "👩‍👩‍👧", "مرحبا", "שלום", "é",
           "\u0301", "\x00", "\x1b[31m", "null", "NaN", "[", "]", "{", "}"]
LONG = "long " * 40_001  # 200,005 characters
HUNDRED_TURNS = json.dumps([f"turn {i}" for i in range(100)])
CONSTANT_CELLS = ["", " ", "[]", "[null]", "null", "[null, null]", "[unclosed", '{"role": "user"}', "123", "-1e309",
                  "true", '[[["deep"]]]', '["a", 1, 2.5, null, ["x", null], {"k": "v"}]', HUNDRED_TURNS,
                  json.dumps(["\ud83d\ude00 split \ud83d"]), "[" * 5000]

text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(HOSTILE)), max_size=8).map("".join)
# subnormal floats are left out: the training code flushes denormals process-wide (torch.set_flush_denormal),
# after which hypothesis cannot generate them; they say nothing about text parsing anyway
turn = st.one_of(st.none(), st.integers(-10**30, 10**30), st.floats(allow_subnormal=False), st.booleans(), text,
                 st.lists(st.one_of(st.none(), text), max_size=3))


@st.composite
def cells(draw):
    kind = draw(st.sampled_from(["text", "json", "json_raw", "constant", "long"]))
    if kind == "text":
        return draw(text)
    if kind in ("json", "json_raw"):
        return json.dumps(draw(st.lists(turn, max_size=5)), ensure_ascii=kind == "json")
    if kind == "long":
        return json.dumps([LONG]) if draw(st.booleans()) else LONG
    return draw(st.sampled_from(CONSTANT_CELLS))


ids = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=8)


@st.composite
def hostile_frames(draw, max_rows=5):
    row_ids = draw(st.lists(ids, min_size=1, max_size=max_rows, unique_by=str.strip))
    rows = []
    for row_id in row_ids:
        prompt, a = draw(cells()), draw(cells())
        b = a if draw(st.integers(0, 4)) == 0 else draw(cells())  # identical answers now and then
        rows.append({"id": row_id, "prompt": prompt, "response_a": a, "response_b": b})
    return pd.DataFrame(rows, dtype=object)


def write_csv(frame: pd.DataFrame, path, crlf: bool) -> None:
    # pandas leaves a cell holding a lone CR unquoted (a file no reader can split right): quote every cell
    # then; otherwise only what needs it. Lone surrogates cannot be UTF-8: they reach the file as the
    # bytes "surrogatepass" makes of them (the reader turns those into U+FFFD).
    lone_cr = frame.map(lambda v: isinstance(v, str) and "\r" in v.replace("\r\n", "")).to_numpy().any()
    text = frame.to_csv(index=False, lineterminator="\r\n" if crlf else "\n",
                        quoting=csv.QUOTE_ALL if lone_cr else csv.QUOTE_MINIMAL)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def expected_ids(frame: pd.DataFrame) -> list[str]:
    return [str(i).strip() for i in frame["id"]]


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tiny_tokenizer), head_hidden=16)
    return model.eval()


def predict_probs(model, tokenizer, path, fmt=None) -> tuple[list[str], np.ndarray]:
    """The prediction data path of `prediction.predict` (reader, encoder, length-sorted batches, gather)."""
    dm = PreferenceDataModule(predict_path=str(path), stats_norm=NEUTRAL_NORM, max_length=MAX_LENGTH,
                              eval_batch_size=3, predict_format=fmt)
    dm.attach_tokenizer(tokenizer)
    dm.setup("predict")
    with torch.no_grad():
        outputs = [model.predict_step(batch, i) for i, batch in enumerate(dm.predict_dataloader())]
    probs = softmax(gather_predictions(outputs, len(dm.predict_records)))
    return [r.id for r in dm.predict_records], probs


def check_probs(probs: np.ndarray, n_rows: int, n_classes: int = 3) -> None:
    assert probs.shape == (n_rows, n_classes)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)


# ---- readers and tokenizer --------------------------------------------------------------------
@SETTINGS
@given(cell=st.one_of(cells(), turn))
def test_parse_turns_always_gives_encodable_text(cell, tiny_tokenizer):
    turns = parse_turns(cell)
    assert turns and all(isinstance(t, str) for t in turns)
    for t in turns:
        t.encode("utf-8")  # no lone surrogate survives
    tiny_tokenizer(turns, add_special_tokens=False)


@SETTINGS
@given(frame=hostile_frames(), crlf=st.booleans(), fmt=st.sampled_from([None, "kaggle", "wsdm"]))
def test_csv_reader_and_encoder_keep_every_row_in_order(frame, crlf, fmt, tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("hostile") / "test.csv"
    write_csv(frame, path, crlf)
    records = read_any(path, fmt)
    assert [r.id for r in records] == expected_ids(frame)
    pairs = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=MAX_LENGTH)).encode(records)
    assert [p.index for p in pairs] == list(range(len(records)))
    for p in pairs:
        assert 3 <= len(p.ids_a) <= MAX_LENGTH and 3 <= len(p.ids_b) <= MAX_LENGTH
        assert np.isfinite(p.stats_a).all() and np.isfinite(p.stats_b).all()


@SETTINGS
@given(frame=hostile_frames(), crlf=st.booleans())
def test_prediction_gives_one_row_per_id_in_order_csv(frame, crlf, tmp_path_factory, tiny_tokenizer, tiny_model):
    path = tmp_path_factory.mktemp("hostile") / "test.csv"
    write_csv(frame, path, crlf)
    got_ids, probs = predict_probs(tiny_model, tiny_tokenizer, path)
    assert got_ids == expected_ids(frame)
    check_probs(probs, len(frame))
    sub = submission_frame(got_ids, probs)
    assert list(sub.columns) == ["id", *CLASS_COLUMNS] and sub["id"].tolist() == got_ids


@SETTINGS
@given(frame=hostile_frames(), fmt=st.sampled_from(["kaggle", "wsdm"]), as_lists=st.booleans())
def test_prediction_gives_one_row_per_id_in_order_parquet(frame, fmt, as_lists, tmp_path_factory, tiny_tokenizer,
                                                          tiny_model):
    from pref_lightning.data.records import repair_text

    # Arrow strings are UTF-8: lone surrogates reach parquet only JSON-escaped (as Kaggle writes them)
    frame = frame.map(repair_text)
    if as_lists:  # parquet may hold real lists of turns (with nulls) instead of JSON text
        for column in ("prompt", "response_a", "response_b"):
            frame[column] = [[c, None, c[:3]] for c in frame[column]]
    path = tmp_path_factory.mktemp("hostile") / "test.parquet"
    frame.to_parquet(path)
    got_ids, probs = predict_probs(tiny_model, tiny_tokenizer, path, fmt)
    assert got_ids == expected_ids(frame)
    check_probs(probs, len(frame))
    assert winner_frame(got_ids, probs)["winner"].isin(["model_a", "model_b"]).all()


def test_named_extremes_in_one_file(tmp_path, tiny_tokenizer, tiny_model):
    """Each hostile case of the issue once, deterministically (also a regression file for the suite)."""
    rows = [
        ("long", json.dumps(["q"]), json.dumps([LONG]), json.dumps(["short"])),
        ("turns", HUNDRED_TURNS, json.dumps(["one"]), json.dumps([f"t{i}" for i in range(37)])),
        ("same", json.dumps(["q"]), json.dumps(["identical"]), json.dumps(["identical"])),
        ("nulls", "[null]", "[null, 3, [1, [2]]]", "[]"),
        ("surrogates", json.dumps(["\ud83d half"]), json.dumps(["\ud83d\ude00"]), '["\\udfff"]'),
        ("rtl", "\u202e\u200fمرحبا\u200b", "שלום \u200d", "\ufeff"),
        ("crlf", 'say "hi",\r\nthen go', "a\r\nb", '""'),
        ("notjson", "[unclosed", "{not json", "123abc"),
        ("empty", "", "", ""),
    ]
    frame = pd.DataFrame(rows, columns=["id", "prompt", "response_a", "response_b"])
    write_csv(frame, tmp_path / "t.csv", crlf=True)
    got_ids, probs = predict_probs(tiny_model, tiny_tokenizer, tmp_path / "t.csv")
    assert got_ids == frame["id"].tolist()
    check_probs(probs, len(frame))
    records = read_any(tmp_path / "t.csv")
    assert len(records[1].prompt) == 100 and len(records[1].response_b) == 37
    assert records[0].response_a[0] == LONG


# ---- training: malformed labels and columns -----------------------------------------------------
BAD_LABELS = ["", "yes", "2", "0.5", "-1", "nan", "1e9", "[1]", "\ud800", "真"]


def clean_frame(n):
    labels = np.arange(n) % 3
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": [f'["q{i}"]' for i in range(n)], "response_a": ['["a"]'] * n,
                         "response_b": ['["b"]'] * n,
                         **{c: (labels == j).astype(int).astype(str) for j, c in enumerate(CLASS_COLUMNS)}},
                        dtype=object)


@SETTINGS
@given(n=st.integers(1, 6), data=st.data())
def test_malformed_label_names_file_id_and_column(n, data, tmp_path_factory):
    frame = clean_frame(n)
    row = data.draw(st.integers(0, n - 1))
    column = data.draw(st.sampled_from(CLASS_COLUMNS))
    bad = data.draw(st.one_of(st.sampled_from(BAD_LABELS), text))
    assume(bad.strip() not in ("0", "1", "0.0", "1.0", "00", "01", "+0", "+1", "-0", "1.", "0."))
    try:
        assume(float(bad) not in (0.0, 1.0))
    except (ValueError, OverflowError):
        pass
    frame.loc[row, column] = bad
    path = tmp_path_factory.mktemp("bad") / "train.csv"
    write_csv(frame, path, crlf=False)
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert str(path) in message and f"id=r{row}" in message and column in message
    kept = read_source(path, on_bad_rows="skip")
    assert [r.id for r in kept.records] == [f"r{i}" for i in range(n) if i != row]
    assert [s["id"] for s in kept.skipped] == [f"r{row}"] and column in kept.skipped[0]["column"]


@pytest.mark.parametrize("values", [("0", "0", "0"), ("1", "1", "0"), ("1", "1", "1")])
def test_not_exactly_one_winner_names_the_columns(values, tmp_path):
    frame = clean_frame(3)
    for c, v in zip(CLASS_COLUMNS, values):
        frame.loc[1, c] = v
    write_csv(frame, tmp_path / "train.csv", crlf=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.csv'}: row id=r1: column winner_model_a, "):
        read_records(tmp_path / "train.csv")


@pytest.mark.parametrize("column", ["id", "prompt", "response_a", "response_b", *CLASS_COLUMNS])
def test_missing_column_names_file_and_column(column, tmp_path):
    clean_frame(3).drop(columns=[column]).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.csv'}: missing column\(s\) {column}"):
        read_records(tmp_path / "train.csv")


@SETTINGS
@given(bad=st.one_of(st.sampled_from(["", "tie", "Model_C", "1", "model a"]), text))
def test_wsdm_malformed_winner_names_file_id_and_column(bad, tmp_path_factory):
    assume(bad.strip().lower() not in ("model_a", "model_b", "tie", "tie (bothbad)"))
    from pref_lightning.data.records import repair_text

    frame = pd.DataFrame({"id": ["w1", "w2"], "prompt": ["p", "q"], "response_a": ["a", "b"],
                          "response_b": ["c", "d"], "winner": ["model_a", repair_text(bad)]})
    path = tmp_path_factory.mktemp("wsdm") / "train.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError) as err:
        read_source(path, "wsdm", n_classes=2)
    assert str(path) in str(err.value) and "id=w2" in str(err.value) and "column winner" in str(err.value)


def test_training_datamodule_on_bad_rows(tmp_path, caplog):
    frame = pd.concat([clean_frame(40), clean_frame(3).assign(id=["x1", "x2", "x3"])], ignore_index=True)
    frame.loc[40, "winner_tie"] = "?"
    frame.loc[42, "winner_model_a"] = ""
    write_csv(frame, tmp_path / "train.csv", crlf=False)
    with pytest.raises(DataError, match="id=x1: column winner_tie"):
        PreferenceDataModule(train_path=str(tmp_path / "train.csv")).load_records()
    dm = PreferenceDataModule(train_path=str(tmp_path / "train.csv"), on_bad_rows="skip", val_fraction=0.5)
    dm.load_records()
    assert dm.data_counts["train_file"]["skipped_bad_rows"] == 2
    assert "id=x1 column=winner_tie" in caplog.text and "id=x3 column=winner_model_a" in caplog.text
    assert "skipped 2 of 43 rows" in caplog.text
    with pytest.raises(ValueError, match="on_bad_rows"):
        PreferenceDataModule(train_path="x.csv", on_bad_rows="ignore")


# ---- the full predict.py path on a tiny checkpoint -----------------------------------------------
def tiny_checkpoint(path, tokenizer, n_classes=3):
    from pref_lightning.data.tokenizers import tokenizer_files

    torch.manual_seed(0)
    spec = EncodingSpec(max_length=MAX_LENGTH, n_classes=n_classes, stats_norm=NEUTRAL_NORM)
    model = PreferenceModule(backbone="tiny", tiny_config=TEST_TINY, vocab_size=len(tokenizer), head_hidden=16,
                             spec=spec, tokenizer_files=tokenizer_files(tokenizer))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def run_predict(*overrides):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = warm.run([sys.executable, "predict.py", *overrides, "trainer.enable_progress_bar=false",
                       "trainer.accelerator=cpu"], cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.slow
def test_predict_script_on_hostile_csv_and_wsdm_parquet(tmp_path, tiny_tokenizer):
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", tiny_tokenizer)
    rows = [{"id": f" id-{i} ", "prompt": c[0], "response_a": c[1], "response_b": c[2]} for i, c in
            enumerate([(HUNDRED_TURNS, json.dumps([LONG]), "[null]"), ("\ud83d", "a\r\nb", "a\r\nb"),
                       ("", "", ""), ("[unclosed", '["x", 1, [2, null]]', "\u202e\u200b"), ('"q"', "'a'", "")])]
    frame = pd.DataFrame(rows, dtype=object)
    write_csv(frame, tmp_path / "test.csv", crlf=True)
    run_predict(f"ckpt_path={ckpt}", f"input_path={tmp_path / 'test.csv'}", f"output_path={tmp_path / 'sub.csv'}",
                f"hydra.run.dir={tmp_path / 'p1'}")
    sub = pd.read_csv(tmp_path / "sub.csv", dtype={"id": str}, keep_default_na=False)
    assert sub["id"].tolist() == [f"id-{i}" for i in range(5)]
    check_probs(sub[list(CLASS_COLUMNS)].to_numpy(), 5)

    binary = tiny_checkpoint(tmp_path / "binary.ckpt", tiny_tokenizer, n_classes=2)
    wsdm = pd.DataFrame({"id": ["b", "a", "c"], "prompt": ["¿Qué?", "[1, 2]", LONG],
                         "response_a": ["x", "", "same"], "response_b": ["y", None, "same"], "scored": [True] * 3})
    wsdm.to_parquet(tmp_path / "test.parquet")
    run_predict(f"ckpt_path={binary}", f"input_path={tmp_path / 'test.parquet'}",
                f"output_path={tmp_path / 'wsdm.csv'}", f"hydra.run.dir={tmp_path / 'p2'}")
    sub = pd.read_csv(tmp_path / "wsdm.csv", dtype=str)
    assert list(sub.columns) == ["id", "winner"] and sub["id"].tolist() == ["b", "a", "c"]
    assert sub["winner"].isin(["model_a", "model_b"]).all()
