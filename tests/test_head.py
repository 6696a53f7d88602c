import pytest
import torch

from pref_lightning.model.head import PairHead, pool

SWAP = [1, 0, 2]


def test_symmetric_head_is_position_equivariant_exactly():
    torch.manual_seed(0)
    head = PairHead(16, hidden=32, stats_size=5, symmetric=True).double()
    a, b = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    sa, sb = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    forward = head(a, b, sa, sb)
    swapped = head(b, a, sb, sa)
    assert torch.equal(forward[:, 0], swapped[:, 1]) and torch.equal(forward[:, 1], swapped[:, 0])
    assert torch.allclose(forward[:, 2], swapped[:, 2], atol=1e-12, rtol=0)


def test_symmetric_head_on_tie_less_data_swaps_its_two_logits():
    torch.manual_seed(0)
    head = PairHead(16, hidden=32, n_classes=2, symmetric=True, n_sources=2).double()
    a, b = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    source = torch.tensor([0, 1, 0, 1, 1])
    forward, swapped = head(a, b, source=source), head(b, a, source=source)
    assert forward.shape == (5, 2) and head.tie is None
    assert torch.equal(forward, swapped[:, [1, 0]])
    with pytest.raises(ValueError, match="4 classes"):
        PairHead(16, n_classes=4, symmetric=True)


def test_plain_head_is_not_equivariant_but_shapes_match():
    torch.manual_seed(0)
    head = PairHead(16, hidden=32)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    out = head(a, b)
    assert out.shape == (4, 3)
    assert not torch.allclose(out[:, SWAP], head(b, a))


def test_stats_head_needs_stats():
    head = PairHead(8, hidden=8, stats_size=3)
    with pytest.raises(ValueError, match="text statistics"):
        head(torch.randn(2, 8), torch.randn(2, 8))


def test_unknown_combination_rejected():
    with pytest.raises(ValueError, match="model.combine"):
        PairHead(8, combine=("a", "max"))


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").item() == 2.0
    assert pool(hidden, mask, "cls").item() == 1.0
