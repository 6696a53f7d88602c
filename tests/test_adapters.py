"""Adapters of external data sets into the one record schema, on small hand-made files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pref_lightning.data.adapters import coin, detect_format, read_frame, read_source
from pref_lightning.data.records import DataError
from pref_lightning.data.text_stats import NULL_TURN


def arena_row(qid, winner, user=("hi",), a=("A1",), b=("B1",), language="English"):
    def conv(answers):
        out = []
        for i, u in enumerate(user):
            out.append({"role": "user", "content": u})
            if i < len(answers):
                out.append({"role": "assistant", "content": answers[i]})
        return out

    return {"question_id": qid, "model_a": "gpt-4", "model_b": "vicuna-13b", "winner": winner,
            "judge": "arena_user_1", "conversation_a": conv(a), "conversation_b": conv(b), "turn": len(user),
            "anony": True, "language": language, "tstamp": 1682351591.1322}


ARENA = [arena_row("q1", "model_a"), arena_row("q2", "model_b", user=("u1", "u2"), a=("a1", "a2"), b=("b1",)),
         arena_row("q3", "tie"), arena_row("q4", "tie (bothbad)", a=(None,), language="German")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_arena_conversations(tmp_path, suffix):
    path = tmp_path / f"arena{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ARENA)
    elif suffix == ".json":
        path.write_text(json.dumps(ARENA))
    else:
        pd.DataFrame(ARENA).to_parquet(path)
    data = read_source(path)
    assert data.format == "arena_conversations" and data.rows_read == 4 and not data.skipped
    r = data.records
    assert [x.id for x in r] == ["q1", "q2", "q3", "q4"]
    assert [x.label for x in r] == [0, 1, 2, 2]  # "tie (bothbad)" is a tie
    assert r[1].prompt == ["u1", "u2"] and r[1].response_a == ["a1", "a2"] and r[1].response_b == ["b1"]
    assert r[3].response_a == [NULL_TURN]
    assert r[0].extra == {"source": "arena", "format": "arena_conversations", "model_a": "gpt-4",
                          "model_b": "vicuna-13b", "language": "English", "turn": "1"}


def test_arena_bad_winner_raises_or_skips(tmp_path):
    path = write_jsonl(tmp_path / "arena.jsonl", [*ARENA, arena_row("q5", "model_c")])
    with pytest.raises(DataError, match=r"arena.jsonl: row id=q5: column winner has 'model_c'"):
        read_source(path)
    data = read_source(path, on_bad_rows="skip")
    assert [r.id for r in data.records] == ["q1", "q2", "q3", "q4"]
    assert data.skipped == [{"file": str(path), "id": "q5", "column": "winner",
                             "reason": "has 'model_c', expected one of model_a, model_b, tie, tie (bothbad)"}]
    # prediction keeps every row
    assert [r.label for r in read_source(path, require_labels=False).records] == [0, 1, 2, 2, None]


def test_arena_broken_conversation_and_duplicate_ids(tmp_path):
    bad = {**arena_row("q9", "model_a"), "conversation_b": "not json"}
    path = write_jsonl(tmp_path / "arena.jsonl", [ARENA[0], bad])
    with pytest.raises(DataError, match="row id=q9: column conversation_b"):
        read_source(path)
    assert len(read_source(path, require_labels=False).records) == 2
    path = write_jsonl(tmp_path / "dup.jsonl", [ARENA[0], ARENA[0]])
    with pytest.raises(DataError, match="column question_id has duplicate value"):
        read_source(path)


def wsdm_frame(with_winner=True):
    frame = pd.DataFrame({"id": ["w1", "w2", "w3"], "prompt": ["Привет", '["not", "a list"]', "¿Qué?"],
                          "response_a": ["a", "", "x" * 10], "response_b": ["b", "same", "same"],
                          "model_a": ["m1", "m2", "m3"], "model_b": ["n1", "n2", "n3"],
                          "language": ["Russian", "English", "Spanish"]})
    if with_winner:
        frame["winner"] = ["model_a", "model_b", "model_a"]
    else:
        frame["scored"] = [True, False, True]
    return frame


def test_wsdm_train_and_test(tmp_path):
    wsdm_frame().to_parquet(tmp_path / "train.parquet")
    data = read_source(tmp_path / "train.parquet")
    assert data.format == "wsdm"
    r = data.records
    assert [x.label for x in r] == [0, 1, 0]
    assert r[1].prompt == ['["not", "a list"]']  # plain strings are never parsed as JSON
    assert r[1].response_a == [""] and r[0].extra["language"] == "Russian"
    wsdm_frame(False).to_parquet(tmp_path / "test.parquet")
    test = read_source(tmp_path / "test.parquet", require_labels=False)
    assert test.format == "wsdm" and [x.label for x in test.records] == [None] * 3
    assert test.records[0].extra["scored"] == "True"


def test_wsdm_binary_tie_is_a_bad_row(tmp_path):
    frame = wsdm_frame()
    frame.loc[2, "winner"] = "tie"
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match="row id=w3: column winner is a tie"):
        read_source(tmp_path / "t.parquet", n_classes=2)
    assert [r.id for r in read_source(tmp_path / "t.parquet", n_classes=2, on_bad_rows="skip").records] == ["w1", "w2"]
    assert [r.label for r in read_source(tmp_path / "t.parquet").records] == [0, 1, 2]  # 3-class: a tie


def test_chosen_rejected_seeded_coin_is_order_independent(tmp_path):
    frame = pd.DataFrame({"prompt": [f"q{i}" for i in range(40)], "chosen": [f"good {i}" for i in range(40)],
                          "rejected": [f'["bad {i}"]' for i in range(40)]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    frame.iloc[::-1].to_csv(tmp_path / "reversed.csv", index=False)
    one = {r.id: r for r in read_source(tmp_path / "pairs.csv", seed=1).records}
    two = {r.id: r for r in read_source(tmp_path / "reversed.csv", seed=1).records}
    assert one.keys() == two.keys() and len(one) == 40
    for rid, r in one.items():
        assert (r.label, r.response_a) == (two[rid].label, two[rid].response_a)
        chosen = r.response_a if r.label == 0 else r.response_b
        rejected = r.response_b if r.label == 0 else r.response_a
        assert chosen[0].startswith("good") and rejected[0].startswith("bad")
        assert r.extra["format"] == "chosen_rejected"
    labels = [r.label for r in one.values()]
    assert 5 < sum(labels) < 35  # both sides occur
    other = [r.label for r in read_source(tmp_path / "pairs.csv", seed=2).records]
    assert other != [one[r].label for r in one]
    assert coin(1, "x") == coin(1, "x")


def test_chosen_rejected_with_ids(tmp_path):
    pd.DataFrame({"id": ["p1", "p2"], "prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}) \
        .to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    assert [r.id for r in read_source(tmp_path / "pairs.jsonl").records] == ["p1", "p2"]


def test_kaggle_adapter_matches_read_records(synthetic_csv):
    from pref_lightning.data.records import read_records

    data = read_source(synthetic_csv)
    plain = read_records(synthetic_csv)
    assert data.format == "kaggle" and len(data.records) == len(plain)
    for a, b in zip(data.records, plain):
        assert (a.id, a.prompt, a.response_a, a.response_b, a.label) == (b.id, b.prompt, b.response_a,
                                                                         b.response_b, b.label)
        assert a.extra["source"] == "train" and a.extra["format"] == "kaggle"


def test_detect_format_unlabelled(tmp_path):
    kaggle_test = pd.DataFrame({"id": ["1"], "prompt": ['["q"]'], "response_a": ['["a"]'], "response_b": ['["b"]']})
    assert detect_format(kaggle_test) == "kaggle"
    assert detect_format(kaggle_test.assign(prompt=["plain question"])) == "kaggle"
    assert detect_format(kaggle_test.assign(scored=[True])) == "wsdm"
    assert detect_format(pd.DataFrame({"x": [1]}), "f.csv") == "kaggle"
    pd.DataFrame({"id": ["1"], "prompt": ["q"], "response_a": ["a"]}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match=r"f.csv: missing column\(s\) response_b"):
        read_source(tmp_path / "f.csv", require_labels=False)
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_frame(tmp_path / "bad.jsonl")
