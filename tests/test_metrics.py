import math

import torch

from pref_lightning.core.metrics import LogLoss, competition_log_loss


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


def test_probability_floor_bounds_every_class_and_keeps_rows_normalised():
    import numpy as np
    import pytest

    from pref_lightning.core.metrics import check_floor, class_probabilities, mix_floor

    logits = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 0.0]])
    probs = class_probabilities(logits, floor=0.002)
    assert probs.min() >= 0.002 - 1e-9 and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs[1], torch.full((3,), 1 / 3))  # uniform stays uniform
    # a row labelled with a class the model ruled out costs at most -ln(floor)
    assert float(competition_log_loss(probs[:1], torch.tensor([1]))) <= -math.log(0.002) + 1e-6
    assert np.allclose(mix_floor(np.array([[1.0, 0.0]]), 0.1), [[0.9, 0.1]])  # numpy too
    assert mix_floor(probs, 0.0) is probs
    with pytest.raises(ValueError, match="prob_floor"):
        check_floor(0.34, 3)


def test_log_loss_of_read_only_arrays_warns_nothing():
    # np.broadcast_to (the class prior repeated per row) and arrays read from files are read-only:
    # torch.as_tensor on them printed torch's "NumPy array is not writable" warning on every run
    import warnings

    import numpy as np

    from pref_lightning.core.metrics import log_loss, prior_log_loss

    labels = np.array([0, 1, 2, 2])
    labels.setflags(write=False)
    prior = np.broadcast_to(np.array([0.25, 0.25, 0.5]), (4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = log_loss(prior, labels)
        assert math.isclose(prior_log_loss(labels, labels), loss, rel_tol=1e-12)
    assert math.isclose(loss, -(2 * math.log(0.25) + 2 * math.log(0.5)) / 4, rel_tol=1e-12)
