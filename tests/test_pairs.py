import numpy as np
import pytest

from pref_lightning.data.contract import EncodingSpec
from pref_lightning.data.pairs import VERDICT_MARKERS, PairEncoder, fit_turns, head_tail, split_budget
from pref_lightning.data.records import PairRecord

SEP = 2


def test_head_tail_keeps_both_ends():
    assert head_tail(list(range(10)), 4) == [0, 1, 8, 9]
    assert head_tail(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert head_tail([1, 2], 5) == [1, 2]
    assert head_tail([1, 2], 0) == []


def test_fit_turns_latest_first():
    turns = [[10] * 5, [20] * 5, [30] * 5]
    assert fit_turns(turns, 100, SEP) == [10] * 5 + [SEP] + [20] * 5 + [SEP] + [30] * 5
    # room for the last turn and part of the middle one, nothing of the first
    out = fit_turns(turns, 9, SEP)
    assert len(out) == 9 and out[-5:] == [30] * 5 and 10 not in out
    assert out[3] == SEP


def test_split_budget_gives_each_segment_a_share():
    assert split_budget(10, 20, 100, 0.3) == (10, 20)
    assert split_budget(500, 500, 100, 0.3) == (30, 70)
    assert split_budget(500, 20, 100, 0.3) == (80, 20)  # short answer leaves room to the prompt
    assert split_budget(5, 500, 100, 0.3) == (5, 95)


def make_record(prompt_words, a_words, b_words, turns=1, label=0):
    def turn_list(n):
        return [" ".join(f"w{i}" for i in range(n))] * turns
    return PairRecord("1", turn_list(prompt_words), turn_list(a_words), turn_list(b_words), label=label)


def test_truncation_keeps_all_three_segments(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=64, prompt_fraction=0.3))
    record = PairRecord("x", ["alpha " * 400], ["beta " * 400 + "ENDA"], ["gamma gamma"])
    pair = encoder.encode([record])[0]
    assert len(pair.ids_a) == 64 and len(pair.ids_b) <= 64
    for ids, answer_word in ((pair.ids_a, "beta"), (pair.ids_b, "gamma")):
        text = tiny_tokenizer.decode(ids)
        assert "alpha" in text and answer_word in text
        assert ids[0] == tiny_tokenizer.cls_token_id and ids[-1] == tiny_tokenizer.sep_token_id
        assert (ids == tiny_tokenizer.sep_token_id).sum() == 2
    # the tail of a long answer survives
    assert "ENDA" in tiny_tokenizer.decode(pair.ids_a).replace(" ", "")
    # B is short, so its side keeps all of it and more of the prompt
    assert tiny_tokenizer.decode(pair.ids_b).count("gamma") == 2


def test_multi_turn_keeps_latest_turns(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=40))
    record = PairRecord("x", ["first question " * 3, "second question"], ["old answer " * 30, "latest reply"],
                        ["old answer " * 30, "newest words"])
    pair = encoder.encode([record])[0]
    text = tiny_tokenizer.decode(pair.ids_a)
    assert "latest reply" in text and "second question" in text


def test_no_truncation_when_it_fits(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=256))
    record = PairRecord("x", ["a short prompt"], ["answer one"], ["answer two"], label=2)
    pair = encoder.encode([record])[0]
    assert tiny_tokenizer.decode(pair.ids_a, skip_special_tokens=True).split() == "a short prompt answer one".split()
    assert pair.label == 2 and pair.index == 0 and pair.ids_a.dtype == np.int32


def test_bad_settings_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        PairEncoder(tiny_tokenizer, EncodingSpec(max_length=4))
    with pytest.raises(ValueError, match="prompt_fraction"):
        PairEncoder(tiny_tokenizer, EncodingSpec(prompt_fraction=1.5))


def test_cross_layout_budget_keeps_both_answers(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=64, layout="cross"))
    record = PairRecord("x", ["alpha " * 100], ["beta " * 100], ["gamma " * 100])
    pair = encoder.encode([record])[0]
    assert len(pair.ids_a) == 64 and len(pair.ids_b) == 64 and len(pair) == 64
    text = tiny_tokenizer.decode(pair.ids_a)
    assert "alpha" in text and "beta" in text and "gamma" in text
    assert (pair.ids_a == tiny_tokenizer.sep_token_id).sum() == 3
    # ids_b: the same row with the answers exchanged (swap augmentation / TTA)
    swapped = tiny_tokenizer.decode(pair.ids_b)
    assert swapped.index("gamma") < swapped.index("beta") and text.index("beta") < text.index("gamma")


def _find(ids, part) -> int:
    ids = list(ids)
    return next(i for i in range(len(ids) - len(part) + 1) if ids[i:i + len(part)] == list(part))


def test_cross_verdict_template_marks_segments_and_ends_with_the_question(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=96, layout="cross", template="verdict"))
    m = encoder.markers
    assert set(m) == {"prompt", "a", "b", "verdict"} and all(m.values())

    def tok(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    cls, sep = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    short = encoder.encode([PairRecord("y", ["alpha"], ["beta"], ["gamma"])])[0]
    assert list(short.ids_a) == [cls, *m["prompt"], *tok("alpha"), *m["a"], *tok("beta"), *m["b"], *tok("gamma"),
                                 *m["verdict"], sep]
    assert list(short.ids_b) == [cls, *m["prompt"], *tok("alpha"), *m["a"], *tok("gamma"), *m["b"], *tok("beta"),
                                 *m["verdict"], sep]
    # too long: every segment keeps a share behind its marker, and the question still closes the row
    pair = encoder.encode([PairRecord("x", ["alpha " * 100], ["beta " * 100], ["gamma " * 100])])[0]
    assert len(pair.ids_a) == 96 and len(pair.ids_b) == 96
    for ids, first, second in ((pair.ids_a, "beta", "gamma"), (pair.ids_b, "gamma", "beta")):
        a_at, b_at = _find(ids, m["a"]), _find(ids, m["b"])
        assert list(ids[-len(m["verdict"]) - 1:]) == [*m["verdict"], sep]
        assert "alpha" in tiny_tokenizer.decode(ids[:a_at])
        assert first in tiny_tokenizer.decode(ids[a_at:b_at]) and second not in tiny_tokenizer.decode(ids[a_at:b_at])
        assert second in tiny_tokenizer.decode(ids[b_at:])


def test_verdict_template_settings_are_checked(tiny_tokenizer):
    with pytest.raises(ValueError, match="data.template"):
        EncodingSpec(template="verdict")  # siamese
    with pytest.raises(ValueError, match="data.template"):
        EncodingSpec(layout="cross", template="chat")
    with pytest.raises(ValueError, match="data.max_length=16"):
        PairEncoder(tiny_tokenizer, EncodingSpec(max_length=16, layout="cross", template="verdict"))


def test_cross_layout_naive_truncation_cuts_answer_b_away(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=64, layout="cross", naive_truncation=True))
    record = PairRecord("x", ["alpha " * 100], ["beta " * 100], ["gamma " * 100])
    text = tiny_tokenizer.decode(encoder.encode([record])[0].ids_a)
    assert "alpha" in text and "gamma" not in text


def test_unknown_layout_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="data.layout"):
        PairEncoder(tiny_tokenizer, EncodingSpec(layout="triple"))


def test_statistics_are_those_the_spec_names(tiny_tokenizer):
    from pref_lightning.data.contract import LEGACY_STATS_FEATURES, STATS_FEATURES

    records = [PairRecord("x", ["why?"], ["I'm sorry, I can't."], ["Because the sky is blue."]),
               PairRecord("y", ["hi"], ["Hello there"], ["hello   there"])]
    full = PairEncoder(tiny_tokenizer, EncodingSpec()).encode(records)
    legacy = PairEncoder(tiny_tokenizer, EncodingSpec(stats_features=LEGACY_STATS_FEATURES)).encode(records)
    assert full[0].stats_a.shape == (len(STATS_FEATURES),) and legacy[0].stats_a.shape == (13,)
    for new, old in zip(full, legacy):
        np.testing.assert_array_equal(new.stats_a[:13], old.stats_a)
    column = {name: i for i, name in enumerate(STATS_FEATURES)}
    assert full[0].stats_a[column["refusal"]] == 1.0 and full[0].stats_b[column["refusal"]] == 0.0
    assert full[1].stats_a[column["identical"]] == full[1].stats_b[column["identical"]] == 1.0
    assert full[0].stats_a[column["overlap"]] == full[0].stats_b[column["overlap"]] < 0.5


@pytest.mark.parametrize("family", ["deberta", "llama"])
def test_special_token_text_in_user_content_stays_text(family, tiny_tokenizer, llm_dirs):
    # chat data holds "</s>", "[SEP]", "<pad>" as text (code, tokenizer questions): they were tokenized to the
    # control tokens themselves (an eos mid-answer for pad = eos models; a [SEP] inside DeBERTa's segments)
    from pref_lightning.model.backbone import load_tokenizer

    tokenizer = tiny_tokenizer if family == "deberta" else load_tokenizer(str(llm_dirs["llama"]))
    # control tokens (the unknown token is not one: characters the tiny vocabulary lacks map to it)
    specials = (set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>")
                                                  if t in tokenizer.get_vocab()}) - {tokenizer.unk_token_id}
    text = "print('</s>') <s> [SEP] x [CLS] y <pad> [PAD] [MASK] [UNK] <|user|> done"
    # the tokenizer alone does turn the text into control tokens: the test text really spells them
    assert set(tokenizer(text, add_special_tokens=False)["input_ids"]) & specials
    encoder = PairEncoder(tokenizer, EncodingSpec(max_length=128))
    (ids,) = encoder.tokenize_turns([text])
    assert not set(ids) & specials
    record = PairRecord("r", [text], [text], ["plain answer"], label=0)
    (pair,) = encoder.encode([record])
    for side in (pair.ids_a, pair.ids_b):
        placed = [i for i in side.tolist() if i in specials]
        # only what the encoder places itself: the start token and the segment separators
        assert placed == [encoder.cls_id, encoder.sep_id, encoder.sep_id], tokenizer.convert_ids_to_tokens(placed)
        assert side[0] == encoder.cls_id and side[-1] == encoder.sep_id


def test_the_cache_key_holds_the_special_token_policy(tiny_tokenizer):
    from pref_lightning.data.cache import pairs_key_fields

    assert pairs_key_fields("0" * 64, PairEncoder(tiny_tokenizer, EncodingSpec(max_length=48)), True)[
        "split_special_tokens"] is True

# ---- data.truncation_side ---------------------------------------------------------------------------
LONG = PairRecord("x", ["first question " * 20, "alpha " * 60 + "PEND"], ["beta " * 80 + "AEND"],
                  ["gamma " * 80 + "BEND"])


@pytest.mark.parametrize("layout,template", [("siamese", "plain"), ("cross", "plain"), ("cross", "verdict")])
def test_left_truncation_keeps_the_last_tokens_and_right_the_first(tiny_tokenizer, layout, template):
    whole = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=4096, layout=layout, template=template)).encode([LONG])[0]
    budgeted = PairEncoder(tiny_tokenizer, EncodingSpec(max_length=64, layout=layout, template=template)).encode([LONG])[0]
    tail = 1 if template == "plain" else 1 + len(tiny_tokenizer(VERDICT_MARKERS["verdict"], add_special_tokens=False)["input_ids"])
    for side in ("left", "right"):
        spec = EncodingSpec(max_length=64, layout=layout, template=template, truncation_side=side)
        pair = PairEncoder(tiny_tokenizer, spec).encode([LONG])[0]
        for ids, full in ((pair.ids_a, whole.ids_a), (pair.ids_b, whole.ids_b)):
            assert len(full) > 200 and len(ids) == 64
            # the first token and the closing tokens (separator; the verdict question) always stay
            assert ids[0] == full[0] and list(ids[-tail:]) == list(full[-tail:])
            body, full_body = list(ids[1:-tail]), list(full[1:-tail])
            assert body == (full_body[-len(body):] if side == "left" else full_body[:len(body)]), side
        text = tiny_tokenizer.decode(pair.ids_a).replace(" ", "")
        if side == "left":  # the end of the conversation: the last answer's end, not the first question
            assert ("BEND" if layout == "cross" else "AEND") in text and "firstquestion" not in text
        else:
            assert "firstquestion" in text and "BEND" not in text and "AEND" not in text
        assert not np.array_equal(pair.ids_a, budgeted.ids_a)
    # budgeted stays the default, and its cache key is the one written before the setting existed
    default = EncodingSpec(max_length=64, layout=layout, template=template)
    assert default.truncation_side == "budgeted" and "truncation_side" not in default.tokenization_key()
    assert default.replace(truncation_side="left").tokenization_key() != default.tokenization_key()
    assert default.replace(truncation_side="left").tokenization_key() != default.replace(
        truncation_side="right").tokenization_key()


def test_rows_that_fit_are_the_same_whatever_the_truncation_side(tiny_tokenizer):
    record = PairRecord("x", ["a short prompt"], ["answer one"], ["answer two"])
    for layout, template in (("siamese", "plain"), ("cross", "verdict")):
        encoded = [PairEncoder(tiny_tokenizer, EncodingSpec(max_length=128, layout=layout, template=template,
                                                            truncation_side=side)).encode([record])[0]
                   for side in ("budgeted", "left", "right")]
        for other in encoded[1:]:
            np.testing.assert_array_equal(other.ids_a, encoded[0].ids_a)
            np.testing.assert_array_equal(other.ids_b, encoded[0].ids_b)


def test_truncation_side_is_checked_and_old_specs_load_as_budgeted():
    with pytest.raises(ValueError, match="data.truncation_side='middle'"):
        EncodingSpec(truncation_side="middle")
    with pytest.raises(ValueError, match="data.naive_truncation=true and data.truncation_side=left"):
        EncodingSpec(layout="cross", naive_truncation=True, truncation_side="left")
    old = {k: v for k, v in EncodingSpec().to_dict().items() if k != "truncation_side"}  # a checkpoint's spec
    assert EncodingSpec.from_dict(old).truncation_side == "budgeted"
    assert EncodingSpec.from_dict(EncodingSpec(truncation_side="left").to_dict()).truncation_side == "left"
