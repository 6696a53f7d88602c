"""The wings redesign (issue 20) changed no behaviour: checkpoints written by the code before it (format 2:
tiny DeBERTa, a BERT/MiniLM-family encoder, a LoRA adapter on a tiny Llama; format 1 in test_checkpoint.py)
predict what they predicted then, and the same training command gives the same metrics.json numbers.
The fixtures and the commands that wrote them are in tests/data/README.md."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from .conftest import REPO
from .test_end_to_end import run

PREMOVE = REPO / "tests" / "data" / "premove"
INPUT = REPO / "tests" / "data" / "format1_input.csv"
COMMON = ["data.synthetic_rows=300", "data.max_length=48", "data.batch_size=16", "model.head_hidden=16",
          "trainer.max_epochs=1", "report=false", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
          # the embedded default's recipe when the fixture was written (issue 21 changed it in conf/experiment/embedded.yaml)
          "model.interaction=none", "model.relevance_weight=0.0", "model.lr=1e-3", "model.head_lr=1e-3",
          "model.symmetric_head=false", "model.tiny_config.relative_attention=true",
          "model.tiny_config.position_biased_input=false", "model.tiny_config.pos_att_type=[p2c,c2p]",
          "model.tiny_config.norm_rel_ebd=layer_norm"]
TINY = ["model.tokenizer_vocab_size=300", "model.tiny_config.hidden_size=32", "model.tiny_config.num_hidden_layers=1",
        "model.tiny_config.num_attention_heads=2", "model.tiny_config.intermediate_size=64",
        "model.tiny_config.max_position_embeddings=128"]
# numbers that depend on the clock or the folder, not on what was computed
NOT_COMPARED = {"wall_seconds", "best_checkpoint", "run_info"}


@pytest.mark.parametrize("name", ["deberta", "bert", "lora"])
def test_a_checkpoint_written_before_the_redesign_predicts_the_same(tmp_path, name):
    output = tmp_path / "submission.csv"
    base = [f"model.backbone={PREMOVE / 'tiny_llama'}"] if name == "lora" else []
    run("predict.py", f"ckpt_path={PREMOVE / f'format2_{name}.ckpt'}", f"input_path={INPUT}", f"output_path={output}",
        *base)
    got = pd.read_csv(output, dtype={"id": str})
    expected = pd.read_csv(PREMOVE / f"format2_{name}_expected.csv", dtype={"id": str})
    assert got["id"].tolist() == expected["id"].tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)


def numbers(metrics: dict, prefix: str = "") -> dict[str, float | str]:
    """Every leaf of metrics.json except the clock- and folder-dependent ones, flattened."""
    flat = {}
    for key, value in metrics.items():
        if key in NOT_COMPARED:
            continue
        if isinstance(value, dict):
            flat.update(numbers(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def test_the_same_training_command_gives_the_same_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", *COMMON, *TINY, f"hydra.run.dir={run_dir}")
    got = numbers(json.loads((run_dir / "metrics.json").read_text()))
    expected = numbers(json.loads((PREMOVE / "deberta_metrics.json").read_text()))
    assert set(got) == set(expected), set(got) ^ set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert got[key] == value, key
