"""`python -m pref_lightning.train [experiment=full_data] [key=value ...]`: train a preference model (the same
command line as the repository's `train.py`, which calls this; the configs ship inside the package)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import pref_lightning.train.sweep  # noqa: F401  (registers the sweep job-folder resolver conf/hydra uses)
from pref_lightning.core import cli
from pref_lightning.train.resume import check_run_folder
from pref_lightning.train.training import train

# absolute: Hydra reads a relative config_path as a Python package path when this runs as an import
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    # the value is returned for Hydra sweepers that optimise it
    return cli.run(lambda: train(cfg), clean_run_dir=True)[cfg.get("optimized_metric", "val_log_loss")]


def run() -> None:
    cli.check_override_keys("train")  # a typo in a key: one line, before Hydra makes a run folder
    # hydra.run.dir=RUN holding another configuration's run: one line, before Hydra writes into it
    check_run_folder(sys.argv[1:], Path(CONF))
    main()


if __name__ == "__main__":
    run()
