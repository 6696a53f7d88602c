"""Train a preference model: `python train.py [experiment=full_data] [key=value ...]` (the same as
`python -m pref_lightning.train ...` once the package is installed)."""

from pref_lightning.train.__main__ import run

if __name__ == "__main__":
    run()
