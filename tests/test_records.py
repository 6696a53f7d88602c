import json

import numpy as np
import pandas as pd
import pytest

from pref_lightning.core.metrics import class_prior, prior_log_loss
from pref_lightning.data.records import DataError, parse_turns, read_records, repair_text
from pref_lightning.data.text_stats import NULL_TURN

from .conftest import ARENA_SAMPLE, needs_shared_data

HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
          "winner_model_a", "winner_model_b", "winner_tie"]


def write(tmp_path, rows, columns=HEADER, name="train.csv"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def row(i, prompt='["hi"]', a='["a"]', b='["b"]', label=(1, 0, 0)):
    return [i, "m1", "m2", prompt, a, b, *label]


def test_parse_turns_json_list_keeps_turns():
    assert parse_turns('["first", "second"]') == ["first", "second"]


def test_parse_turns_null_becomes_visible_placeholder():
    assert parse_turns('[null, "x"]') == [NULL_TURN, "x"]
    assert parse_turns("null") == [NULL_TURN]


def test_parse_turns_plain_text_is_one_turn():
    assert parse_turns("just text, not json") == ["just text, not json"]
    assert parse_turns("[not json") == ["[not json"]


def test_parse_turns_numbers_nested_and_empty():
    assert parse_turns("[1, 2.5]") == ["1", "2.5"]
    assert parse_turns('[["a", "b"]]') == ['["a", "b"]']
    assert parse_turns("") == [""]
    assert parse_turns("[]") == [""]
    assert parse_turns('"quoted"') == ["quoted"]


def test_lone_surrogates_are_repaired_and_pairs_joined():
    # Kaggle's ensure_ascii JSON: a lone high surrogate, and a valid pair (an emoji)
    turns = parse_turns('["bad \\ud83d end", "ok \\ud83d\\ude00"]')
    assert turns == ["bad \ufffd end", "ok \U0001f600"]
    for t in turns:
        t.encode("utf-8")  # must not raise
    assert repair_text("plain") == "plain"


def test_read_records_labels_and_order(tmp_path):
    path = write(tmp_path, [row(7, label=(0, 1, 0)), row(3, label=(0, 0, 1)), row(5)])
    records = read_records(path)
    assert [r.id for r in records] == ["7", "3", "5"]
    assert [r.label for r in records] == [1, 2, 0]


def test_bad_label_names_file_id_and_columns(tmp_path):
    path = write(tmp_path, [row(1), row(2, label=(1, 1, 0))])
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert str(path) in message and "id=2" in message
    assert "winner_model_a" in message and "winner_tie" in message


def test_non_numeric_label_names_column(tmp_path):
    path = write(tmp_path, [row(1, label=("yes", 0, 0))])
    with pytest.raises(DataError, match=r"id=1: column winner_model_a has 'yes'"):
        read_records(path)


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, [row(1)[:-1]], columns=HEADER[:-1])
    with pytest.raises(DataError, match=r"missing column\(s\) winner_tie") as err:
        read_records(path)
    assert str(path) in str(err.value)
    # prediction does not need the labels
    assert len(read_records(path, require_labels=False)) == 1


def test_duplicate_ids_are_an_error(tmp_path):
    path = write(tmp_path, [row(1), row(1)])
    with pytest.raises(DataError, match="column id has duplicate value"):
        read_records(path)


def test_empty_files_are_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_records(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(HEADER) + "\n")
    with pytest.raises(DataError, match="no rows"):
        read_records(header_only)
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.csv")


def test_test_file_never_drops_rows_even_when_messy(tmp_path):
    columns = ["id", "prompt", "response_a", "response_b"]
    rows = [[1, '["p"]', "[null]", '["b"]'], [2, "", "", ""], [3, "not json", '["x", null]', "[1]"],
            [4, '["\\ud800"]', '["\\udfff"]', '["a\\r\\nb \\"q\\""]']]
    path = write(tmp_path, rows, columns=columns, name="test.csv")
    records = read_records(path, require_labels=False)
    assert [r.id for r in records] == ["1", "2", "3", "4"]
    assert records[0].response_a == [NULL_TURN]
    assert records[2].prompt == ["not json"] and records[2].response_a == ["x", NULL_TURN]
    assert all(r.label is None for r in records)


def test_parquet_with_real_lists(tmp_path):
    frame = pd.DataFrame({"id": [1, 2], "prompt": [["p1", "p2"], ["q"]], "response_a": [["a1", None], ["a"]],
                          "response_b": [json.dumps(["b1", "b2"]), json.dumps(["b"])],
                          "winner_model_a": [1, 0], "winner_model_b": [0, 0], "winner_tie": [0, 1]})
    path = tmp_path / "train.parquet"
    frame.to_parquet(path)
    records = read_records(path)
    assert records[0].prompt == ["p1", "p2"] and records[0].response_a == ["a1", NULL_TURN]
    assert records[0].response_b == ["b1", "b2"] and [r.label for r in records] == [0, 2]


def test_prior_log_loss_matches_formula():
    train = np.array([0, 0, 1, 2])
    evaluation = np.array([0, 1])
    prior = class_prior(train)
    assert prior.tolist() == [0.5, 0.25, 0.25]
    assert prior_log_loss(train, evaluation) == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2)


@needs_shared_data()
def test_real_arena_sample_parses():
    records = read_records(ARENA_SAMPLE)
    assert len(records) == 999
    labels = np.array([r.label for r in records])
    assert set(labels.tolist()) == {0, 1, 2}
    assert sum(NULL_TURN in r.response_a + r.response_b for r in records) >= 3
    for r in records:  # surrogates repaired: everything encodes
        for turn in r.prompt + r.response_a + r.response_b:
            turn.encode("utf-8")
        assert len(r.prompt) == len(r.response_a) == len(r.response_b)


def test_empty_prompts_get_one_notice_line(tmp_path, caplog):
    # an empty prompt cell was predicted without a word: one line with the count, for training and prediction
    import logging

    from pref_lightning.data.adapters import read_any, read_source
    from pref_lightning.data.records import read_records

    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "prompt": ['["hi"]', '[""]', "", '[null]'],
                          "response_a": ['["x"]'] * 4, "response_b": ['["y"]'] * 4,
                          "winner_model_a": [1, 0, 0, 1], "winner_model_b": [0, 1, 0, 0], "winner_tie": [0, 0, 1, 0]})
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    for read in (lambda: read_records(path), lambda: read_source(path).records, lambda: read_any(path)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert len(read()) == 4  # every row kept
        notices = [r.getMessage() for r in caplog.records if "empty prompt" in r.getMessage()]
        assert len(notices) == 1, notices
        assert f"{path}: 3 of 4 rows have an empty prompt (id b, c, d)" in notices[0]
    caplog.clear()
    frame.assign(prompt='["hi"]').to_csv(path, index=False)
    with caplog.at_level(logging.INFO):
        read_records(path)
    assert not [r for r in caplog.records if "empty prompt" in r.getMessage()]
