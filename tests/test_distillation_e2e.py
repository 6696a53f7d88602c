"""predict.py's output is what data.teacher_path reads: train -> predict -> train on the teacher's probabilities."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .test_end_to_end import FAST, run

pytestmark = pytest.mark.slow
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
         "trainer.accelerator=cpu", "trainer.precision=32-true", "data.num_workers=0", "data.cache_dir=null",
         "report=false", *FAST]


def test_predict_output_trains_a_student(tmp_path, synthetic_csv):
    teacher_run = tmp_path / "teacher"
    run("train.py", "data=kaggle", f"data.train_path={synthetic_csv}", f"hydra.run.dir={teacher_run}", *SHORT)
    # the teacher scores the training file (as it would an unlabelled file: labels are not needed)
    unlabelled = tmp_path / "unlabelled.csv"
    pd.read_csv(synthetic_csv, dtype=str).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]) \
        .to_csv(unlabelled, index=False)
    submission = tmp_path / "teacher.csv"
    run("predict.py", f"ckpt_path={teacher_run / 'checkpoints' / 'best.ckpt'}", f"input_path={unlabelled}",
        f"output_path={submission}", f"hydra.run.dir={tmp_path / 'pred'}", "trainer.enable_progress_bar=false")
    student_run = tmp_path / "student"
    run("train.py", "data=kaggle", f"data.train_path={synthetic_csv}", f"data.teacher_path={submission}",
        "data.teacher_weight=0.7", "data.teacher_temperature=2.0", "model.label_smoothing=0.05",
        f"hydra.run.dir={student_run}", *SHORT)
    metrics = json.loads((student_run / "metrics.json").read_text())
    teacher = metrics["data_counts"]["teacher"]
    assert teacher["training_rows_matched"] == metrics["train_rows"] and teacher["training_rows_hard_only"] == 0
    assert (teacher["weight"], teacher["temperature"]) == (0.7, 2.0)
    assert metrics["val_log_loss"] < 5
