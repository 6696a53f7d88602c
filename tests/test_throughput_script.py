"""The throughput benchmark script runs end to end on a very small config and writes sane JSON.

It measures nothing here (timings on a tiny config mean nothing); it checks the plumbing: three
subprocess setups, the collected results, the ratios and the keys other tools read.
"""

from __future__ import annotations

import json
import math

import pytest

from .conftest import load_benchmark


def load_script():
    return load_benchmark("throughput")


def test_helpers():
    bench = load_script()
    # two batches: [3, 5] padded to 5 and [4] alone
    assert bench.efficiency(bench.side_batches([[3], [5], [4]], [[0, 1], [2]])) == pytest.approx(12 / 14)
    # siamese rows count both sides, padded to the longest side of the batch
    assert bench.efficiency(bench.side_batches([[2, 4], [4, 4]], [[0, 1]])) == pytest.approx(14 / 16)
    stats = bench.window_stats([0.0, 1.0, 3.0], [0.5, 2.0, 4.0], [(8, 10), (6, 10), (10, 10)], warmup=1, steps=2,
                               batch_size=2, rows_per_step=[2, 2, 2])
    assert stats["window_s"] == pytest.approx(3.5)  # end of step 0 -> end of step 2
    assert stats["train_rows_per_s"] == pytest.approx(4 / 3.5)
    assert stats["padding_efficiency"] == pytest.approx(16 / 20)
    assert stats["between_steps_share"] == pytest.approx(1 - 2.0 / 3.5)
    assert bench.steps_for(2, 20, 8) == 40 and bench.steps_for(8, 20, 8) == 20
    # sides in length groups: [2, 4] and [4, 4] -> sides 4, 4, 4 padded to 4 and the side of 2 alone
    assert bench.efficiency(bench.grouped_side_batches([[2, 4], [4, 4]], [[0, 1]], 2)) == pytest.approx(1.0)


def fake_result(rows_per_s: float, efficiency: float, seq: int, predict: float | None) -> dict:
    steps = [0.5, 1.5]
    out = {"train_rows_per_s": rows_per_s, "padding_efficiency": efficiency, "padding_efficiency_epoch": efficiency,
           "padding_efficiency_pair_bound": 0.8, "real_tokens_per_row": 400.0 * seq,
           "processed_tokens_per_row": 400.0 * seq / efficiency, "mean_real_tokens_per_row_all": 410.0 * seq,
           "real_tokens_per_s": rows_per_s * 400 * seq, "processed_tokens_per_s": rows_per_s * 400 * seq / efficiency,
           "between_steps_share": 0.01, "sequences_per_row": seq, "steps": 2, "peak_rss_mb": 1000.0, "max_length": 1024,
           "step_s": steps, "step_tokens": [(2000, 2400), (7000, 8000)], "step_rows": [8, 8], "mega_batch_rows": 400,
           "mega_batch_mult": 50, "padding_efficiency_epoch_by_mega_batch_mult": {"50": efficiency},
           "foreign_cpu_share": 0.0}
    if predict is not None:
        out.update(predict_rows_per_s=predict, predict_padding_efficiency=efficiency)
    return out


def test_report_with_two_batch_sizes():
    bench = load_script()
    results = {"hf_cross": {8: fake_result(5.0, 0.5, 1, 8.0), 2: fake_result(15.0, 0.75, 1, None)},
               "pl_cross": {8: fake_result(20.0, 0.98, 1, 40.0), 2: fake_result(25.0, 0.99, 1, None)},
               "pl_siamese": {8: fake_result(12.0, 0.76, 2, 30.0), 2: fake_result(20.0, 0.8, 2, None)},
               "pl_siamese_grouped": {8: fake_result(16.0, 0.96, 2, 32.0), 2: fake_result(24.0, 0.97, 2, None)}}
    for r in results["pl_siamese_grouped"].values():
        r["side_groups"] = 4
    results["pl_siamese_grouped"][8].update(predict_token_budget=1000, predict_token_budget_rows_per_s=48.0,
                                            predict_token_budget_batches=3, predict_token_budget_padding_efficiency=0.97,
                                            predict_token_budget_max_abs_logit_diff=1e-6)
    summary = bench.summarise(results, 8)
    assert summary["train_speedup_cross"] == pytest.approx(4.0)
    assert summary["padding_bound"] == pytest.approx(2.0) and summary["fraction_of_bound"] == pytest.approx(2.0)
    assert summary["predict_speedup"] == pytest.approx(5.0)
    assert summary["baseline_best_batch_size"] == 2
    assert summary["train_speedup_cross_vs_best_baseline"] == pytest.approx(20 / 15)
    assert summary["train_speedup_siamese"] == pytest.approx(16 / 5) and summary["padding_efficiency_siamese"] == 0.96
    assert summary["train_speedup_siamese_vs_best_baseline"] == pytest.approx(16 / 15)
    assert summary["predict_speedup_token_budget"] == pytest.approx(6.0)
    assert summary["siamese_grouped_vs_one_call_by_batch"] == {"8": pytest.approx(16 / 12), "2": pytest.approx(24 / 20)}
    notes = bench.diagnoses(results, summary, 8, contended=False)
    assert any("fastest at batch 2" in n for n in notes)
    assert any("siamese (c) padding efficiency" in n for n in notes)
    assert [name for name, *_, ok in bench.target_rows(summary) if not ok] == [
        "(d)/(a at its best batch 2) train rows/s >= 1.5x"]
    report = {"config": {"batch_sizes": [8, 2], "rows": 10, "max_length": 1024, "warmup": 1, "steps": 2,
                         "mega_batch_mult": 50},
              "results": {s: {str(bs): r for bs, r in by_bs.items()} for s, by_bs in results.items()},
              "machine": {"cpu_model": "cpu", "cpus_usable": 2, "torch": "x", "torch_threads": 2},
              "data": {"median_answer_chars": 900.0, "predict_rows": 10}, "contended": False,
              "summary": summary, "diagnoses": notes}
    table = bench.markdown(report)
    assert table.count("| (a) HF Trainer") == 2 and table.count("NOT met") == 1
    assert table.count("| (d) project, siamese, sides in length groups") == 2


@pytest.mark.slow
def test_script_small_config(tmp_path, capsys):
    # transformers.Trainer (the baseline) needs accelerate: pip install -e ".[bench]"
    pytest.importorskip("accelerate", reason="the HF Trainer baseline needs the bench extra (accelerate)")
    bench = load_script()
    out = tmp_path / "throughput.json"
    report = bench.main(["--rows", "40", "--max-length", "64", "--steps", "2", "--warmup", "1",
                         "--batch-sizes", "4", "--predict-rows", "12", "--vocab-size", "600", "--retries", "0", "--llm",
                         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["train_speedup_cross"] == pytest.approx(report["train_speedup_cross"])
    for key in ("train_speedup_cross", "train_speedup_siamese", "padding_efficiency", "baseline_padding_efficiency",
                "predict_speedup", "padding_efficiency_siamese", "train_speedup_siamese", "predict_speedup_token_budget",
                "train_speedup_siamese_vs_best_baseline", "machine", "results", "summary", "targets", "config"):
        assert key in data, key
    for key in ("padding_efficiency", "baseline_padding_efficiency"):
        assert 0 < data[key] <= 1, (key, data[key])
    for key in ("train_speedup_cross", "train_speedup_siamese", "predict_speedup"):
        assert data[key] > 0 and math.isfinite(data[key]), (key, data[key])
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    assert set(data["results"]) == {"hf_cross", "pl_cross", "pl_siamese", "pl_siamese_grouped", "pl_llama_lora"}
    llama, deberta = data["results"]["pl_llama_lora"]["4"], data["results"]["pl_siamese_grouped"]["4"]
    assert llama["trainable_parameters"] < 0.5 * llama["parameters"]  # LoRA: a small share trains
    assert deberta["trainable_parameters"] == deberta["parameters"]
    assert data["results"]["pl_siamese_grouped"]["4"]["predict_token_budget_max_abs_logit_diff"] < 1e-4
    for setup, by_bs in data["results"].items():
        r = by_bs["4"]
        assert r["train_rows_per_s"] > 0 and r["peak_rss_mb"] > 50, setup
        assert r["predict_rows"] == 12 and r["predict_rows_per_s"] > 0, setup
        assert 0 < r["padding_efficiency_epoch"] <= 1 and 0 < r["padding_efficiency"] <= 1, setup
        assert r["timed_rows"] == 2 * 4, setup
        assert r["sequences_per_row"] == (2 if setup in ("pl_siamese", "pl_siamese_grouped", "pl_llama_lora") else 1)
    printed = capsys.readouterr().out
    assert "| (a) HF Trainer" in printed and "padding efficiency (b)" in printed
    assert "| tiny Llama, LoRA r=8 all-linear (e) |" in printed
