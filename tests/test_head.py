import pytest
import torch

from pref_lightning.core.errors import UserError
from pref_lightning.model.head import PairHead, output_layers, pool

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


def test_davidson_head_scores_each_side_alone():
    """symmetric="davidson": the win logits are a Bradley-Terry score difference, so they swap exactly with the
    sides and chain (d(a, b) + d(b, c) = d(a, c)), which the equivariant MLP head does not; the tie logit falls by
    kappa * |d| and is order-free; zeroed output layers (the anchored head's step 0) give zero logits."""
    torch.manual_seed(0)
    a, b, c = (torch.randn(6, 16, dtype=torch.float64) for _ in range(3))
    s = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    diff = {}
    for form in ("davidson", True):
        head = PairHead(16, hidden=32, stats_size=5, symmetric=form).double()
        ab, ba = head(a, b, s[0], s[1]), head(b, a, s[1], s[0])
        assert torch.equal(ab[:, :2], ba[:, [1, 0]])
        assert torch.allclose(ab[:, 2], ba[:, 2], atol=1e-12, rtol=0)
        d = {(x, y): (lambda o: o[:, 0] - o[:, 1])(head(*pair))
             for (x, y), pair in {(0, 1): (a, b, s[0], s[1]), (1, 2): (b, c, s[1], s[2]),
                                  (0, 2): (a, c, s[0], s[2])}.items()}
        diff[form] = (d[0, 1] + d[1, 2] - d[0, 2]).abs().max().item()
    assert diff["davidson"] < 1e-12 < 0.01 < diff[True]
    head = PairHead(16, hidden=32, symmetric="davidson").double()
    with torch.no_grad():
        head.tie_kappa.fill_(0.0)
        tie_k0 = head(a, b)[:, 2]
        head.tie_kappa.fill_(2.0)
        d = head(a, b)[:, 0] * 2
    softplus = torch.nn.functional.softplus
    # raw kappa 0 -> 2: the tie logit falls by (softplus(2) - softplus(0)) * |d|, the win logits stay
    assert torch.allclose(head(a, b)[:, 2], tie_k0 - (softplus(torch.tensor(2.0)) - softplus(torch.tensor(0.0))) * d.abs())
    for layer in output_layers(head):
        torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    assert torch.equal(head(a, b), torch.zeros(6, 3, dtype=torch.float64))
    binary = PairHead(16, hidden=32, n_classes=2, symmetric="davidson", n_sources=2).double()
    out = binary(a, b, source=torch.tensor([0, 1, 0, 1, 1, 0]))
    assert out.shape == (6, 2) and torch.equal(out[:, 0], -out[:, 1])
    with pytest.raises(UserError, match="symmetric_head='bradley'"):
        PairHead(16, symmetric="bradley")


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
