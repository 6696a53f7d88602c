import numpy as np
import pytest

from pref_lightning.data.sampler import LengthGroupedSampler, padded_row, padding_efficiency, padding_index


def lengths(n=1000, seed=0):
    return np.random.default_rng(seed).lognormal(5, 1, n).astype(int) + 1


def test_training_batches_cover_every_item_once_and_pad_little():
    lens = lengths()
    sampler = LengthGroupedSampler(lens, batch_size=8, shuffle=True, seed=1)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lens)))
    assert len(batches) == len(sampler)
    random_batches = np.array_split(np.random.default_rng(0).permutation(len(lens)), len(lens) // 8)
    assert padding_efficiency(lens, batches) > 0.8 > padding_efficiency(lens, random_batches) + 0.3


def test_training_order_is_random_and_changes_with_epoch():
    lens = lengths()
    sampler = LengthGroupedSampler(lens, batch_size=8, shuffle=True, seed=1)
    first = list(sampler)
    assert first == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    # batch order is shuffled, not sorted by length
    maxima = [max(lens[b]) for b in first]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_evaluation_batches_are_sorted_and_complete():
    lens = lengths(101)
    batches = list(LengthGroupedSampler(lens, batch_size=10, shuffle=False))
    assert sorted(i for b in batches for i in b) == list(range(101))
    maxima = [max(lens[b]) for b in batches]
    assert maxima == sorted(maxima, reverse=True)


def test_ddp_ranks_share_training_batches_evenly():
    lens = lengths(1001)
    ranks = [list(LengthGroupedSampler(lens, 8, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [i for batches in ranks for b in batches for i in b]
    assert set(seen) == set(range(1001))


def test_ddp_evaluation_has_no_duplicates():
    lens = lengths(1001)
    ranks = [list(LengthGroupedSampler(lens, 8, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    seen = [i for batches in ranks for b in batches for i in b]
    assert sorted(i for i in seen if i >= 0) == list(range(1001))
    # the short rank is topped up with one padding copy (a negative index): the same batches per rank
    assert [i for i in seen if i < 0] == [padding_index(ranks[1][-1][-2])]
    assert [len(b) for b in ranks[0]] == [len(b) for b in ranks[1]]


@pytest.mark.parametrize("rows, replicas", [(1, 2), (2, 3), (3, 4), (5, 2), (1, 1)])
def test_ddp_evaluation_with_fewer_rows_than_ranks(rows, replicas):
    """Every rank gets ceil(rows / ranks) rows: its own, then padding copies; each row exactly once."""
    lens = lengths(rows)
    ranks = [[i for b in LengthGroupedSampler(lens, 4, shuffle=False, num_replicas=replicas, rank=r) for i in b]
             for r in range(replicas)]
    assert {len(items) for items in ranks} == {-(-rows // replicas)}
    real = sorted(i for items in ranks for i in items if i >= 0)
    assert real == list(range(rows))
    assert all(0 <= padded_row(i) < rows for items in ranks for i in items if i < 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler([1, 2], 0)
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler([1, 2], 1, num_replicas=2, rank=2)


# ---- token budgets -------------------------------------------------------------------------------
def padded_tokens(lens, batch, sequences=1):
    return len(batch) * int(max(lens[batch])) * sequences


@pytest.mark.parametrize("sequences", [1, 2])
def test_token_budget_batches_respect_the_budget_and_cover_every_row_once(sequences):
    lens = lengths(1000)
    lens[7] = 5000  # one row over the budget on its own
    budget = 4096
    sampler = LengthGroupedSampler(lens, max_tokens=budget, sequences_per_row=sequences, seed=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    assert len(batches) == len(sampler)
    over = [b for b in batches if padded_tokens(lens, b, sequences) > budget]
    assert [7] in over and all(len(b) == 1 for b in over)  # only single rows over the budget on their own
    # variable batch sizes: short rows share a batch, long ones do not
    sizes = {len(b) for b in batches}
    assert min(sizes) == 1 and max(sizes) > 8
    assert padding_efficiency(lens, batches) > 0.8


def test_token_budget_batch_count_is_the_same_every_epoch():
    lens = lengths(1000)
    sampler = LengthGroupedSampler(lens, max_tokens=3000, seed=0, epochs=5)
    counts = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(padded_tokens(lens, b) <= 3000 or len(b) == 1 for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1 and counts[0] == len(sampler) == sampler.epoch_count()
    sampler.set_epoch(1)
    assert list(sampler) != [list(b) for b in LengthGroupedSampler(lens, max_tokens=3000, seed=0, epochs=5)]


def test_token_budget_ddp_ranks_take_equal_batch_counts():
    lens = lengths(1001)
    for shuffle in (True, False):
        ranks = [list(LengthGroupedSampler(lens, max_tokens=2500, shuffle=shuffle, seed=3, num_replicas=2, rank=r))
                 for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(LengthGroupedSampler(
            lens, max_tokens=2500, shuffle=shuffle, seed=3, num_replicas=2, rank=0))
        seen = [i for batches in ranks for b in batches for i in b]
        if shuffle:  # training: every row, a few batches repeated to even the count
            assert set(seen) == set(range(1001))
        else:  # evaluation: each row exactly once, the short rank topped up with a padding copy
            assert sorted(i for i in seen if i >= 0) == list(range(1001))
            assert all(0 <= padded_row(i) < 1001 for i in seen if i < 0)
        rows = [padded_row(i) if i < 0 else i for i in seen]
        assert all(padded_tokens(lens, np.array([padded_row(i) if i < 0 else i for i in b])) <= 2500 or len(b) == 1
                   for batches in ranks for b in batches)
        assert len(rows) == len(seen)


def test_token_budget_resume_mid_epoch_gives_the_remaining_batches():
    lens = lengths(500)
    full = LengthGroupedSampler(lens, max_tokens=2000, seed=4, epochs=3)
    full.set_epoch(1)
    batches = list(full)
    resumed = LengthGroupedSampler(lens, max_tokens=2000, seed=4, epochs=3)
    resumed.resume_at(1, 5)
    assert list(resumed) == batches[5:]
    assert list(resumed) == batches  # the skip applies to one pass only


def test_token_budget_evaluation_is_sorted_longest_first():
    lens = lengths(300)
    batches = list(LengthGroupedSampler(lens, max_tokens=4000, shuffle=False))
    assert sorted(i for b in batches for i in b) == list(range(300))
    maxima = [max(lens[b]) for b in batches]
    assert maxima == sorted(maxima, reverse=True)
    assert all(padded_tokens(lens, b) <= 4000 or len(b) == 1 for b in batches)


def test_bad_token_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        LengthGroupedSampler([1, 2], max_tokens=0)
