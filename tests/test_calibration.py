import torch

from pref_lightning.core.metrics import competition_log_loss
from pref_lightning.train.calibration import fit_temperature


def test_temperature_recovers_overconfidence():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3)
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = 3.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert abs(temperature - 3.0) < 0.3
    before = competition_log_loss(overconfident.softmax(-1), labels)
    after = competition_log_loss((overconfident / temperature).softmax(-1), labels)
    assert after < before - 0.1


def test_temperature_near_one_when_calibrated():
    torch.manual_seed(1)
    logits = torch.randn(4000, 3)
    labels = torch.distributions.Categorical(logits=logits).sample()
    assert abs(fit_temperature(logits, labels) - 1.0) < 0.1


def test_temperature_of_a_model_worse_than_uniform_is_bounded():
    """A model whose logits are confidently wrong fits T -> infinity unbounded (2.4e6 was seen): the
    "calibrated" model is then exactly uniform. The fit stops at the range's upper bound."""
    from pref_lightning.train.calibration import TEMPERATURE_RANGE

    torch.manual_seed(2)
    labels = torch.randint(0, 3, (2000,))
    wrong = 8.0 * torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    assert fit_temperature(wrong, labels) == TEMPERATURE_RANGE[1]
    assert fit_temperature(wrong, labels, floor=0.002) == TEMPERATURE_RANGE[1]
    # very under-confident logits stop at the lower bound
    right = 1e-4 * torch.nn.functional.one_hot(labels, 3).float()
    assert fit_temperature(right, labels) == TEMPERATURE_RANGE[0]


def test_temperature_fitted_with_the_floor_minimises_the_floored_loss():
    from pref_lightning.core.metrics import class_probabilities

    torch.manual_seed(3)
    true_logits = 2 * torch.randn(3000, 3)
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    logits = 4.0 * true_logits
    t = fit_temperature(logits, labels, floor=0.01)

    def loss(temperature):
        return float(competition_log_loss(class_probabilities(logits, temperature, 0.01), labels))

    assert loss(t) <= min(loss(t * 0.9), loss(t * 1.1)) + 1e-6
