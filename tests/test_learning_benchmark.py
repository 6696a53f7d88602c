"""benchmarks/learning.py --parts real: the 5-fold real-data benchmark's plumbing, on a tiny configuration.

It measures nothing here (a tiny backbone trained for two batches); it checks that the variants' overrides
compose, that every fold run validates on exactly the fold the baselines are scored on, and that the OOF
totals are the row-weighted means of the folds."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from .conftest import REPO, SHARED_DATA, TEST_TINY_OVERRIDES, load_benchmark, needs_shared_data


def load_script():
    return load_benchmark("learning")


def test_variant_overrides_compose():
    bench = load_script()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        forced = compose(config_name="train", overrides=[
            "experiment=arena_small", *bench.variant_overrides("ties_forced", SHARED_DATA, {})])
        plain = compose(config_name="train", overrides=["experiment=arena_small", f"paths.data_dir={SHARED_DATA}"])
        tiny = compose(config_name="train", overrides=["experiment=arena_small", "model=tiny"])
    # the extra shared sets, unchanged but for ties: true
    extra = bench.recipe_source_list(SHARED_DATA)
    assert [dict(s) for s in forced.data.sources] == [{**s, "ties": True} for s in extra]
    assert len(extra) == 4 and list(plain.data.sources) == []
    assert bench.variant_overrides("no_anchor", SHARED_DATA, {}) == ["model.anchor_head=false"]
    assert bench.variant_overrides("mine", SHARED_DATA, {"mine": ["model.lr=1e-4"]}) == ["model.lr=1e-4"]
    assert tiny.model.backbone == "tiny" and tiny.model.anchor_head  # model=tiny replaces MiniLM, keeps the rest
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.variant_overrides("nope", SHARED_DATA, {})


def test_oof_total_is_row_weighted():
    bench = load_script()
    assert bench.oof_total({"0": (1.0, 100), "1": (2.0, 300)}) == pytest.approx(1.75)
    assert bench.oof_total({"0": ({"x": 1.0}, 1), "1": ({"x": None}, 1)}, "x") is None


def test_other_fold_choice_never_reads_the_scored_fold():
    """Each fold's blend weight is the best on the other folds: a weight best only on fold k is not chosen
    for fold k, and the OOF is the row-weighted mean of what each fold scores at its chosen weight."""
    bench = load_script()
    per_fold = {"0": {"0.5": 1.0, "1.0": 0.5},   # fold 0 alone prefers 1.0
                "1": {"0.5": 1.0, "1.0": 1.6},
                "2": {"0.5": 1.0, "1.0": 1.3}}
    rows = {"0": 100, "1": 100, "2": 200}
    chosen = bench.other_fold_choice(per_fold, rows)
    assert {k: v["weight"] for k, v in chosen["per_fold"].items()} == {"0": 0.5, "1": 0.5, "2": 0.5}
    assert chosen["oof"] == pytest.approx(1.0)
    # fold 2 now prefers 1.0 too: fold 1 follows folds 0 and 2 to 1.0, though 1.0 is its own worst weight
    per_fold["2"] = {"0.5": 1.0, "1.0": 0.8}
    chosen = bench.other_fold_choice(per_fold, rows)
    assert chosen["per_fold"]["1"] == {"weight": 1.0, "log_loss": 1.6}
    assert chosen["per_fold"]["0"]["weight"] == 0.5 and chosen["per_fold"]["2"]["weight"] == 0.5


def test_selection_counts_each_fold_in_the_blended_runs_own_files(tmp_path):
    """The honest selection weights each fold by its rows in the blended run's own fold<k>/oof.csv, not by an
    entry of the results file that may cover only some folds (a 2-fold proxy stored first: KeyError before)."""
    bench = load_script()
    run = tmp_path / "run"
    for k, n in {"0": 2, "1": 2, "2": 6}.items():
        (run / f"fold{k}").mkdir(parents=True)
        pd.DataFrame({"id": range(n)}).to_csv(run / f"fold{k}" / "oof.csv", index=False)
    per_fold = {"0": {"0.5": 1.0, "1.0": 2.0}, "1": {"0.5": 1.0, "1.0": 2.0}, "2": {"0.5": 2.0, "1.0": 1.0}}
    out = tmp_path / "real.json"
    out.write_text(json.dumps({"proxy": {"fold_rows": {"0": 200, "1": 200}}, "blend:run": {"per_fold": per_fold}}))
    bench.main(["--parts", "selection", "--blend-run", str(run), "--real-out", str(out)])
    chosen = json.loads(out.read_text())["selection:run"]
    # fold 2 (6 rows) outweighs fold 0 or 1 (2 rows): folds 0 and 1 get fold 2's best weight 1.0, fold 2 theirs
    assert {k: v["weight"] for k, v in chosen["per_fold"].items()} == {"0": 1.0, "1": 1.0, "2": 0.5}
    assert chosen["oof"] == pytest.approx(2.0)
    (run / "fold2" / "oof.csv").unlink()
    with pytest.raises(SystemExit, match="fold2/oof.csv"):
        bench.main(["--parts", "selection", "--blend-run", str(run), "--real-out", str(out)])


def test_blend_reads_each_run_uncalibrated_and_names_a_seed_ensemble(tmp_path):
    """A blend undoes each run's calibration (oof.csv holds softmax(z / T) floored; the blend reads
    softmax(z) floored), and several --blend-run folders (a seed ensemble) are one entry named a+b, which
    --parts selection looks up by the same names."""
    import numpy as np
    import torch

    from pref_lightning.core.metrics import class_probabilities

    bench = load_script()
    logits = torch.tensor([[1.0, -0.5, 0.2], [-2.0, 0.3, 0.1], [0.0, 0.0, 3.0]])
    labels = np.array([0, 1, 2])
    fold = tmp_path / "a" / "fold0"
    fold.mkdir(parents=True)
    calibrated = class_probabilities(logits / 1.7, floor=0.002).numpy()
    frame = pd.DataFrame(calibrated, columns=["winner_model_a", "winner_model_b", "winner_tie"])
    frame.insert(0, "id", ["x", "y", "z"])
    frame["label"] = labels
    frame.iloc[::-1].to_csv(fold / "oof.csv", index=False)  # read back in the fold's own row order
    (fold / "metrics.json").write_text(json.dumps({"temperature": 1.7}))
    raw = bench.uncalibrated_oof(fold, ["x", "y", "z"], labels)
    assert raw == pytest.approx(class_probabilities(logits, floor=0.002).numpy(), abs=1e-6)
    with pytest.raises(RuntimeError, match="labels differ"):
        bench.uncalibrated_oof(fold, ["x", "y", "z"], labels[::-1])

    assert bench.blend_name([tmp_path / "a", tmp_path / "b"]) == "a+b"
    (tmp_path / "a" / "fold1").mkdir(parents=True)
    frame.to_csv(tmp_path / "a" / "fold1" / "oof.csv", index=False)
    out = tmp_path / "real.json"
    out.write_text(json.dumps({"blend:a+b": {"per_fold": {"0": {"0.5": 1.0, "1.0": 1.2}, "1": {"0.5": 0.9, "1.0": 0.8}}},
                               "blend:a": {"per_fold": {"0": {"0.5": 1.0}}}}))
    bench.main(["--parts", "selection", "--blend-run", str(tmp_path / "a"), "--blend-run", str(tmp_path / "b"),
                "--real-out", str(out)])
    # each fold takes the other's best weight: fold 0 gets 1.0 (1.2), fold 1 gets 0.5 (0.9)
    assert json.loads(out.read_text())["selection:a+b"]["oof"] == pytest.approx((1.2 + 0.9) / 2)
    with pytest.raises(SystemExit, match="need 2 or more"):
        bench.main(["--parts", "selection", "--blend-run", str(tmp_path / "a"), "--real-out", str(out)])
    out.write_text(json.dumps({}))
    with pytest.raises(SystemExit, match="no 'blend:a'"):
        bench.main(["--parts", "selection", "--blend-run", str(tmp_path / "a"), "--real-out", str(out)])


@pytest.mark.slow
@needs_shared_data()
def test_real_part_on_two_folds_with_a_tiny_model(tmp_path):
    bench = load_script()
    out = tmp_path / "learning_real.json"
    # calibrate=false: each fold run's oof.csv then holds the uncalibrated probabilities of the model it kept,
    # the ones its val_log_loss scores (the fallback total is checked against them below)
    tiny = ["model=tiny", *TEST_TINY_OVERRIDES, "data.max_length=32", "data.eval_batch_size=64", "calibrate=false"]
    argv = ["--parts", "real", "--folds", "0,1", "--variants", "recipe,ties_forced", "--max-train-batches", "2",
            "--add-variant", "no_anchor_tiny:model.anchor_head=false", "--overrides", " ".join(tiny),
            "--real-out", str(out), "--work", str(tmp_path / "runs")]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())["real"]
    assert result["setting"]["max_train_batches"] == 2 and result["setting"]["overrides"] == tiny
    rows = result["fold_rows"]
    assert set(rows) == {"0", "1"} and 150 < rows["0"] < 250
    for name in ("class_prior", "stats_lr", "stats_lr_cv", "anchor_step0"):
        baseline = result["baselines"][name]
        assert set(baseline["per_fold"]) == {"0", "1"}
        expected = sum(baseline["per_fold"][k] * rows[k] for k in rows) / sum(rows.values())
        assert baseline["oof"] == pytest.approx(expected)
    assert 1.0 < result["baselines"]["class_prior"]["oof"] < 1.2
    for name in ("recipe", "ties_forced", "no_anchor_tiny"):
        entry = result["variants"][name]
        assert entry["folds"] == ["0", "1"], entry
        for k, fold in entry["per_fold"].items():
            assert fold["val_rows"] == rows[k] and math.isfinite(fold["val_log_loss"])
        expected = sum(entry["per_fold"][k]["val_log_loss"] * rows[k] for k in rows) / sum(rows.values())
        assert entry["oof"] == pytest.approx(expected)
        assert entry["oof_stats_lr_same_folds"] == pytest.approx(result["baselines"]["stats_lr"]["oof"])
    # anchored runs report the statistics baseline they start from; the unanchored one does not
    recipe = result["variants"]["recipe"]
    assert recipe["per_fold"]["0"]["baseline_log_loss"] is not None
    # independently of the script's min(val, baseline) formula: sklearn's log loss of the probabilities the fold
    # runs kept (model.anchor_fallback: the baseline's where the trained model fell behind it), over both folds
    from sklearn.metrics import log_loss

    from pref_lightning.core.metrics import CLASS_COLUMNS

    oof = pd.concat([pd.read_csv(tmp_path / "runs" / "recipe" / f"fold{k}" / "oof.csv", dtype={"id": str})
                     for k in ("0", "1")], ignore_index=True)
    assert len(oof) == sum(rows.values()) and oof["id"].is_unique
    probs = oof[list(CLASS_COLUMNS)].to_numpy()
    expected = log_loss(oof["label"], probs / probs.sum(1, keepdims=True), labels=[0, 1, 2])
    # the fallback keeps the baseline only beyond 1e-4 behind it: the formula's min differs from the kept
    # model's loss by less than that
    assert recipe["oof_with_fallback"] == pytest.approx(expected, abs=2e-4)
    assert result["variants"]["no_anchor_tiny"]["per_fold"]["0"]["baseline_log_loss"] is None
    assert "ties:true" in " ".join(result["variants"]["ties_forced"]["overrides"])
    # a second call with the same setting adds folds to the stored result instead of replacing it
    bench.main(["--parts", "real", "--folds", "0", "--variants", "", "--max-train-batches", "2",
                "--overrides", " ".join(tiny), "--real-out", str(out), "--work", str(tmp_path / "runs2")])
    again = json.loads(out.read_text())["real"]
    assert again["variants"]["recipe"]["folds"] == ["0", "1"] and set(again["fold_rows"]) == {"0", "1"}


@pytest.mark.slow
@needs_shared_data()
def test_anchor_ablation_scores_each_part_switched_off(tmp_path):
    bench = load_script()
    out = tmp_path / "learning_real.json"
    assert bench.main(["--parts", "anchor", "--folds", "0", "--real-out", str(out)]) == 0
    table = json.loads(out.read_text())["anchor_ablation"]
    assert set(table) == set(bench.ANCHOR_ABLATION)
    for entry in table.values():
        assert set(entry["per_fold"]) == {"0"} and 0.9 < entry["oof"] < 1.2 and entry["what"]
    assert len({round(e["oof"], 6) for e in table.values()}) == len(table)  # every switch changes something
