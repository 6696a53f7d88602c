"""Train a preference model: `python train.py [experiment=full_data] [key=value ...]`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import pref_lightning.train.sweep  # noqa: F401  (registers the sweep job-folder resolver conf/hydra uses)
from pref_lightning.core import cli
from pref_lightning.train.resume import check_run_folder
from pref_lightning.train.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # the value is returned for Hydra sweepers that optimise it
    return cli.run(lambda: train(cfg), clean_run_dir=True)[cfg.get("optimized_metric", "val_log_loss")]


if __name__ == "__main__":
    cli.check_override_keys("train")  # a typo in a key: one line, before Hydra makes a run folder
    # hydra.run.dir=RUN holding another configuration's run: one line, before Hydra writes into it
    check_run_folder(sys.argv[1:], Path(__file__).parent / "conf")
    main()
