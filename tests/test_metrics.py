import math

import torch

from pref_lightning.metrics import LogLoss, competition_log_loss


def test_competition_log_loss_matches_hand_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    target = torch.tensor([0, 2])
    expected = -(math.log(0.7) + math.log(0.6)) / 2
    assert math.isclose(float(competition_log_loss(probs, target)), expected, rel_tol=1e-9)


def test_clipping_and_renormalisation():
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    # a zero probability is clipped to 1e-15, as the competition's metric does
    assert math.isclose(float(competition_log_loss(probs, torch.tensor([1]))), -math.log(1e-15), rel_tol=1e-9)
    unnormalised = torch.tensor([[2.0, 1.0, 1.0]])
    assert math.isclose(float(competition_log_loss(unnormalised, torch.tensor([0]))), math.log(2))


def test_metric_accumulates_over_batches_as_weighted_mean():
    metric = LogLoss()
    metric.update(torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([0]))
    metric.update(torch.full((3, 3), 1 / 3), torch.tensor([0, 1, 2]))
    expected = (math.log(2) + 3 * math.log(3)) / 4
    assert math.isclose(float(metric.compute()), expected, rel_tol=1e-6)
