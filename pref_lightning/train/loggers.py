"""A CSV logger whose curve survives a resume.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so a run resumed in its own
folder (`ckpt_path=last hydra.run.dir=RUN`) would keep only the steps after the resume, and the
report's curves would start in the middle. This one keeps the rows already there and appends.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            # known columns: later rows are appended under the same header (rewritten if new ones come)
            self.metrics_keys = list(header)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that appends to `RUN/csv/metrics.csv` instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
