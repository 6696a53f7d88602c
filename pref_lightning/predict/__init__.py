"""predict: the prediction recipe (`prediction.predict`: checkpoints -> loader -> logits -> ensemble ->
floored probabilities -> submission) and ensembles. `python -m pref_lightning.predict` is `predict.py`.
Imports `core`, `data`, `model`; never `train`."""
