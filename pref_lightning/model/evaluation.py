"""Evaluation policy: how validation, calibration and prediction turn a network's logits into reported
probabilities (swap TTA, temperature, probability floor, anchor blend). Set through one method,
`PreferenceNetwork.set_evaluation`, never by assigning attributes from outside."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import PROB_FLOOR, check_floor


@dataclass(frozen=True)
class EvaluationPolicy:
    """- `tta_swap`: score (A, B) and (B, A) and average (validation and prediction).
    - `temperature`: fitted on validation logits after training (calibration); `calibrated`: whether
      `predict_step` divides the logits by it (prediction's `calibrate` switch).
    - `prob_floor`: every reported probability is at least this (`metrics.mix_floor`; 0 turns it off).
    - `anchor_blend`: w in [0, 1]; evaluation of the anchored model reads w * P(trained) + (1 - w) *
      P(anchor alone) (1: the trained model alone).

    Raises `UserError` naming the `model.` key for a value outside its range (`checked`)."""

    tta_swap: bool = True
    temperature: float = 1.0
    calibrated: bool = True
    prob_floor: float = PROB_FLOOR
    anchor_blend: float = 1.0

    def checked(self, n_classes: int) -> EvaluationPolicy:
        """This policy with plain Python values, refused (UserError) when a value is out of range."""
        floor = check_floor(self.prob_floor, n_classes)
        if not 0.0 <= float(self.anchor_blend) <= 1.0:
            raise UserError(f"model.anchor_blend={self.anchor_blend} must lie in [0, 1] (1: the trained model alone)")
        if not float(self.temperature) > 0.0:
            raise UserError(f"temperature={self.temperature} must be > 0")
        return EvaluationPolicy(bool(self.tta_swap), float(self.temperature), bool(self.calibrated), floor,
                                float(self.anchor_blend))

    def replace(self, n_classes: int, **changes: object) -> EvaluationPolicy:
        """A copy with `changes` (None values ignored), checked."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).checked(n_classes)
