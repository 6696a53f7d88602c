"""train.py / predict.py with extra sources (the shared real files) and the binary WSDM task."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pref_lightning.data.records import records_from_frame

from .conftest import ARENA_SAMPLE, SHARED_DATA, needs_shared_data
from .test_end_to_end import FAST, run

pytestmark = pytest.mark.slow
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
         "trainer.accelerator=cpu", "data.num_workers=0", "data.cache_dir=null", *FAST]


@needs_shared_data()
def test_train_on_a_mix_of_the_shared_real_files(tmp_path):
    run_dir = tmp_path / "mix"
    sources = ",".join([f"{{path:'{SHARED_DATA / 'hh_rlhf_test.csv'}',weight:0.1}}",
                        f"{{path:'{SHARED_DATA / 'autoj_pairwise_test.csv'}'}}",
                        f"{{path:'{SHARED_DATA / 'pandalm_testset_v1.csv'}',weight:0.5}}",
                        f"'{SHARED_DATA / 'hhh_alignment.csv'}'"])
    # real multilingual text has more distinct characters than the tests' 600-token vocabulary holds
    short = [o for o in SHORT if not o.startswith("model.tokenizer_vocab_size")] + ["model.tokenizer_vocab_size=4000"]
    out = run("train.py", "data=mix", f"data.train_path={ARENA_SAMPLE}", f"data.sources=[{sources}]",
              f"hydra.run.dir={run_dir}", *short)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    counts = metrics["data_counts"]
    assert counts["train_file"]["rows_read"] == 999 and metrics["val_rows"] == counts["train_file"]["val_rows"]
    by_name = {c["source"]: c for c in counts["sources"]}
    assert [c["rows_read"] for c in counts["sources"]] == [8514, 1392, 999, 221]
    for c in counts["sources"]:
        assert c["kept"] == c["rows_read"] - c["skipped_bad_rows"] - c["removed_prompt_in_train_file"] \
            - c["removed_exact_duplicates"]
    assert by_name["hh_rlhf_test"]["added_to_train"] == round(0.1 * by_name["hh_rlhf_test"]["kept"])
    assert by_name["hhh_alignment"]["added_to_train"] == by_name["hhh_alignment"]["kept"]
    assert metrics["train_rows"] == counts["train_file"]["train_rows"] + counts["totals"]["added_to_train"]
    assert counts["totals"]["removed_prompt_in_train_file"] > 0  # the real files do share a few prompts
    assert metrics["val_log_loss"] < 5 and "extra source hh_rlhf_test" in out


def wsdm_frame(synthetic_frame, rows, with_winner=True):
    """Synthetic arena rows in the WSDM layout: plain-text cells, A/B winners only (ties dropped)."""
    records = [r for r in records_from_frame(synthetic_frame, "synthetic", require_labels=True) if r.label != 2][:rows]
    frame = pd.DataFrame({"id": [f"w{r.id}" for r in records], "prompt": ["\n".join(r.prompt) for r in records],
                          "response_a": ["\n".join(r.response_a) for r in records],
                          "response_b": ["\n".join(r.response_b) for r in records],
                          "model_a": "m1", "model_b": "m2", "language": "English"})
    if with_winner:
        frame["winner"] = ["model_a" if r.label == 0 else "model_b" for r in records]
    else:
        frame["scored"] = True
    return frame


def test_wsdm_binary_train_and_predict(tmp_path, synthetic_frame):
    wsdm_frame(synthetic_frame, 240).to_parquet(tmp_path / "train.parquet")
    run_dir = tmp_path / "wsdm"
    run("train.py", "data=wsdm", f"data.train_path={tmp_path / 'train.parquet'}", "data.val_fraction=0.2",
        f"hydra.run.dir={run_dir}", *SHORT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_classes"] == 2 and 0 <= metrics["val_accuracy"] <= 1 and metrics["val_log_loss"] < 5
    assert metrics["data_counts"]["train_file"]["format"] == "wsdm"
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["spec"]["n_classes"] == 2
    test = wsdm_frame(synthetic_frame, 40, with_winner=False).iloc[::-1]
    test.to_parquet(tmp_path / "test.parquet")
    run("predict.py", f"ckpt_path={ckpt}", f"input_path={tmp_path / 'test.parquet'}",
        f"output_path={tmp_path / 'submission.csv'}", f"hydra.run.dir={tmp_path / 'pred'}",
        "trainer.enable_progress_bar=false")
    sub = pd.read_csv(tmp_path / "submission.csv", dtype=str)
    assert list(sub.columns) == ["id", "winner"] and sub["id"].tolist() == test["id"].tolist()
    assert sub["winner"].isin(["model_a", "model_b"]).all()
