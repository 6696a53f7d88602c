"""`python -m pref_lightning.predict ckpt_path=RUN/checkpoints/best.ckpt input_path=test.csv
output_path=submission.csv`: write a submission from checkpoints, offline (the same command line as the
repository's `predict.py`, which calls this; the configs ship inside the package)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pref_lightning.core import cli
from pref_lightning.predict.prediction import predict

# absolute: Hydra reads a relative config_path as a Python package path when this runs as an import
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
def main(cfg: DictConfig) -> None:
    cli.run(lambda: predict(cfg))


def run() -> None:
    cli.check_override_keys("predict")  # a typo in a key: one line, before Hydra makes a run folder
    main()


if __name__ == "__main__":
    run()
