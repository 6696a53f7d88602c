"""Learning benchmark: does the model learn, on synthetic data with a known oracle and on real data?

Prints a table and writes benchmarks/results/learning.json. Parts (all on CPU, offline):
  synthetic  the embedded default (`python train.py`) with 3 training seeds: val log loss vs prior
             and oracle (target: every seed within 0.03 nats of the oracle)
  real       pretrained all-MiniLM-L6-v2 (optional extra) trained on the real rows of ../shared/data,
             validated on a prompt-grouped part of the arena sample, against two baselines computed
             here on the same split: the class prior and a logistic regression on text statistics
  recipe     the public notebooks' failing recipe (pretrained encoder, lr 2e-5 for backbone and head, fp16
             (Lightning runs 16-mixed as bf16 on CPU),
             dropout on, no warmup, no text statistics, tiny data): does PriorGuard flag it?

    python benchmarks/learning.py [--parts synthetic,real,recipe] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pref_lightning.folds import grouped_split  # noqa: E402
from pref_lightning.metrics import CLASS_COLUMNS, class_prior, log_loss, prior_log_loss  # noqa: E402
from pref_lightning.records import label_array, read_records  # noqa: E402
from pref_lightning.text_stats import fit_logistic_regression, pair_stats_matrix, predict_proba  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
REAL_EXTRA = ["hh_rlhf_test.csv", "autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "hhh_alignment.csv"]


def train(run_dir: Path, *overrides: str) -> tuple[dict, str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *QUIET, *overrides],
                            cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{result.stderr[-4000:]}")
    return json.loads((run_dir / "metrics.json").read_text()), result.stdout + result.stderr, seconds


def part_synthetic(work: Path, quick: bool) -> list[dict]:
    rows = []
    extra = ["data.synthetic_rows=3000"] if quick else []
    for seed in (0, 1, 2):
        metrics, _, seconds = train(work / f"synthetic_{seed}", f"seed={seed}", *extra)
        rows.append({"seed": seed, "val_log_loss": metrics["val_log_loss"],
                     "val_log_loss_calibrated": metrics.get("val_log_loss_calibrated"),
                     "prior": metrics["prior_log_loss"], "oracle": metrics["oracle_log_loss"],
                     "gap_to_oracle": metrics["val_log_loss"] - metrics["oracle_log_loss"],
                     "accuracy": metrics["val_accuracy"], "seconds": round(seconds, 1)})
        print(f"synthetic seed {seed}: {rows[-1]}", flush=True)
    return rows


def write_frame(records, path: Path, prefix: str) -> None:
    frame = pd.DataFrame({
        "id": [f"{prefix}{r.id}" for r in records],
        "prompt": [json.dumps(r.prompt) for r in records],
        "response_a": [json.dumps(r.response_a) for r in records],
        "response_b": [json.dumps(r.response_b) for r in records],
        **{c: [int(r.label == j) for r in records] for j, c in enumerate(CLASS_COLUMNS)},
    })
    frame.to_csv(path, index=False, mode="a" if path.exists() else "w", header=not path.exists())


def real_split(data_dir: Path, work: Path, extra_files: list[str], val_fraction: float, max_rows: int | None):
    """train.csv = extra real files + the arena rows not held out; val.csv = held-out arena prompts."""
    arena = read_records(data_dir / "lmsys_arena_sample.csv")
    train_idx, val_idx = grouped_split(arena, val_fraction, seed=0)
    train_records = [arena[i] for i in train_idx]
    val_records = [arena[i] for i in val_idx]
    train_path, val_path = work / "real_train.csv", work / "real_val.csv"
    for path in (train_path, val_path):
        path.unlink(missing_ok=True)
    write_frame(train_records, train_path, "arena-")
    counts = {"arena (train part)": len(train_records)}
    for name in extra_files:
        records = read_records(data_dir / name)
        if max_rows:
            records = records[:max_rows]
        write_frame(records, train_path, f"{Path(name).stem}-")
        train_records += records
        counts[name] = len(records)
    write_frame(val_records, val_path, "arena-")
    return train_records, val_records, train_path, val_path, counts


def part_real(work: Path, data_dir: Path, quick: bool, max_length: int, epochs: int,
              extra_files: list[str] | None = None) -> dict:
    extra = extra_files if extra_files is not None else (REAL_EXTRA[1:] if quick else REAL_EXTRA)
    train_records, val_records, train_path, val_path, counts = real_split(
        data_dir, work, extra, val_fraction=0.4, max_rows=None)
    y_train, y_val = label_array(train_records), label_array(val_records)
    n_arena = counts["arena (train part)"]
    y_arena = y_train[:n_arena]
    # the in-distribution prior (arena training rows) and the prior of the whole training mix, whose
    # extra sets have few or no ties
    prior = prior_log_loss(y_arena, y_val)
    prior_mix = prior_log_loss(y_train, y_val)
    rows = lambda rs: [(r.prompt, r.response_a, r.response_b) for r in rs]  # noqa: E731
    lr_model = fit_logistic_regression(pair_stats_matrix(rows(train_records)), y_train, l2=1e-2)
    stats_lr = log_loss(predict_proba(lr_model, pair_stats_matrix(rows(val_records))), y_val)
    # the same regression fitted on the arena training part only (in-distribution rows)
    arena_train = train_records[:n_arena]
    lr_arena = fit_logistic_regression(pair_stats_matrix(rows(arena_train)), label_array(arena_train), l2=1e-2)
    stats_lr_arena = log_loss(predict_proba(lr_arena, pair_stats_matrix(rows(val_records))), y_val)
    print(f"real: train rows {counts}, val rows {len(val_records)}; prior {prior:.4f} (mix {prior_mix:.4f}), "
          f"text-stats LR {stats_lr:.4f} (arena-only {stats_lr_arena:.4f})", flush=True)
    run_dir = work / "real_minilm"
    metrics, _, seconds = train(
        run_dir, "model=minilm", "data=kaggle", f"data.train_path={train_path}",
        f"data.val_path={val_path}", f"data.max_length={max_length}", "data.batch_size=16",
        "data.eval_batch_size=32", "data.num_workers=0", "data.pad_to_multiple_of=null",
        f"trainer.max_epochs={epochs}", "trainer.val_check_interval=0.5")
    # label-shift correction (no validation labels used): reweight the model's probabilities by
    # arena-train prior / training-mix prior, the known difference between the two distributions
    probs = predict_probs(run_dir / "checkpoints" / "best.ckpt", val_path, work / "val_pred.csv")
    shift = class_prior(y_arena) / class_prior(y_train)
    shifted = probs * shift
    shifted /= shifted.sum(1, keepdims=True)
    result = {"train_rows": counts, "val_rows": len(val_records), "max_length": max_length, "epochs": epochs,
              "prior_log_loss": prior, "prior_mix_log_loss": prior_mix,
              "minilm_uncalibrated_log_loss": log_loss(probs, y_val),
              "minilm_label_shift_log_loss": log_loss(shifted, y_val), "text_stats_lr_log_loss": stats_lr,
              "text_stats_lr_arena_only_log_loss": stats_lr_arena, "minilm_val_log_loss": metrics["val_log_loss"],
              "minilm_val_log_loss_calibrated": metrics.get("val_log_loss_calibrated"),
              "minilm_val_accuracy": metrics["val_accuracy"], "seconds": round(seconds, 1)}
    print(f"real: {result}", flush=True)
    return result


def predict_probs(ckpt: Path, input_path: Path, output: Path) -> np.ndarray:
    result = subprocess.run([sys.executable, "predict.py", f"ckpt_path={ckpt}", f"input_path={input_path}",
                             f"output_path={output}", "calibrate=false", f"hydra.run.dir={output.parent / 'pred'}",
                             "trainer.enable_progress_bar=false"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"predict.py failed:\n{result.stderr[-4000:]}")
    return pd.read_csv(output)[list(CLASS_COLUMNS)].to_numpy()


def part_recipe(work: Path, data_dir: Path) -> dict:
    """The seed notebooks' settings, made to collapse: does the guard say so?"""
    arena = read_records(data_dir / "lmsys_arena_sample.csv")
    small = work / "recipe_train.csv"
    small.unlink(missing_ok=True)
    write_frame(arena[:600], small, "")
    metrics, out, seconds = train(
        work / "recipe", "model=minilm", "data=kaggle", f"data.train_path={small}", "data.val_fraction=0.3",
        "data.max_length=128", "data.batch_size=8", "data.num_workers=0", "data.pad_to_multiple_of=null",
        "model.lr=2e-5", "model.head_lr=2e-5", "model.warmup_ratio=0.0", "model.backbone_dropout=0.1",
        "model.use_text_stats=false", "model.swap_augment=none", "model.tta_swap=false",
        "trainer.precision=16-mixed", "trainer.max_epochs=2", "trainer.val_check_interval=0.5",
        "callbacks.prior_guard.action=warn", "callbacks.prior_guard.patience=2")
    flagged = "PriorGuard" in out and "prior" in out.lower()
    lines = [line for line in out.splitlines() if "PriorGuard" in line][:3]
    result = {"val_log_loss": metrics["val_log_loss"], "prior_log_loss": metrics["prior_log_loss"],
              "guard_flagged": flagged, "guard_lines": lines, "seconds": round(seconds, 1)}
    print(f"recipe: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="synthetic,real,recipe")
    parser.add_argument("--quick", action="store_true", help="fewer rows: a few minutes in all")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--extra-files", default=",".join(REAL_EXTRA),
                        help="real files trained on beside the arena rows (comma-separated, in --data-dir)")
    parser.add_argument("--key", default="real", help="name of the real-data result in the JSON")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning.json")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="pref_learning_") as tmp:
        work = Path(tmp)
        if "synthetic" in parts:
            results["synthetic"] = part_synthetic(work, args.quick)
        if "real" in parts:
            extra = [f for f in args.extra_files.split(",") if f]
            results[args.key] = part_real(work, args.data_dir, args.quick, args.max_length, args.epochs, extra)
        if "recipe" in parts:
            results["recipe"] = part_recipe(work, args.data_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    if "synthetic" in results:
        print("\n| seed | val log loss | calibrated | prior | oracle | gap to oracle | accuracy | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["synthetic"]:
            print(f"| {r['seed']} | {r['val_log_loss']:.4f} | {r['val_log_loss_calibrated']:.4f} | {r['prior']:.4f} "
                  f"| {r['oracle']:.4f} | {r['gap_to_oracle']:+.4f} | {r['accuracy']:.3f} | {r['seconds']} |")
        print(f"worst gap to oracle: {max(r['gap_to_oracle'] for r in results['synthetic']):+.4f} (target <= 0.03)")
    for key in [k for k in results if k.startswith("real")]:
        r = results[key]
        print(f"\n{key}: trained on {r['train_rows']} for {r['epochs']} epoch(s), max_length {r['max_length']}, "
              f"{r['seconds']} s")
        print("| real data (arena held-out prompts) | log loss |\n|---|---|")
        print(f"| class prior of the arena training rows | {r['prior_log_loss']:.4f} |")
        print(f"| class prior of the whole training mix | {r['prior_mix_log_loss']:.4f} |")
        print(f"| text-statistics logistic regression | {r['text_stats_lr_log_loss']:.4f} |")
        print(f"| text-statistics LR, arena rows only | {r['text_stats_lr_arena_only_log_loss']:.4f} |")
        print(f"| MiniLM siamese + hybrid head (swap TTA) | {r['minilm_uncalibrated_log_loss']:.4f} |")
        print(f"| ... + temperature fitted on this validation set (optimistic) | "
              f"{r['minilm_val_log_loss_calibrated']:.4f} |")
        print(f"| ... + label-shift correction to the arena-train prior | {r['minilm_label_shift_log_loss']:.4f} |")
    if "recipe" in results:
        r = results["recipe"]
        print(f"\nfailing recipe: val {r['val_log_loss']:.4f} vs prior {r['prior_log_loss']:.4f}; "
              f"PriorGuard flagged: {r['guard_flagged']}")


if __name__ == "__main__":
    raise SystemExit(main())
