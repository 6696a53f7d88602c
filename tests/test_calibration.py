import torch

from pref_lightning.calibration import fit_temperature
from pref_lightning.metrics import competition_log_loss


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
