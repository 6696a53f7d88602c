import numpy as np
import torch

from pref_lightning.data.collate import PairCollator
from pref_lightning.data.pairs import EncodedPair


def pair(n_a, n_b, label, index):
    return EncodedPair(np.arange(1, n_a + 1, dtype=np.int32), np.arange(1, n_b + 1, dtype=np.int32), label, index)


def test_dynamic_padding_to_longest_side():
    batch = PairCollator(pad_id=0)([pair(3, 5, 0, 0), pair(4, 2, 2, 1)])
    assert batch["input_ids"].shape == (4, 5)  # rows: A0, A1, B0, B1
    assert batch["attention_mask"].sum(1).tolist() == [3, 4, 5, 2]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["labels"].tolist() == [0, 2] and batch["index"].tolist() == [0, 1]
    assert batch["input_ids"].dtype == torch.long


def test_pad_to_multiple_of():
    batch = PairCollator(pad_id=7, pad_to_multiple_of=8)([pair(3, 9, -1, 4)])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 3:].eq(7).all()


def test_padding_rows_are_marked_and_plain_batches_have_no_mask():
    from dataclasses import replace

    assert "valid" not in PairCollator(pad_id=0)([pair(3, 5, 0, 0)])
    batch = PairCollator(pad_id=0)([pair(3, 5, 0, 0), replace(pair(3, 5, 0, 0), padding=True)])
    assert batch["valid"].tolist() == [True, False]
