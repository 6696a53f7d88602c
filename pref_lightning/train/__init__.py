"""train: the training recipe (`training.train`) and what runs around `Trainer.fit`: callbacks, PriorGuard,
calibration, resume, loggers, the run report, sweep summaries and training an earlier stage first.
`python -m pref_lightning.train` is `train.py`. Imports `core`, `data`, `model`; never `predict`."""
