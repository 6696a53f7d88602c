"""Learning benchmark: does the model learn, on synthetic data with a known oracle and on real data?

Prints a table and writes benchmarks/results/learning.json. Parts (all on CPU, offline):
  synthetic  the embedded default (`python train.py`) with 3 training seeds: val log loss vs prior
             and oracle (target: every seed within 0.03 nats of the oracle)
  real       5-fold out-of-fold log loss over the 999 rows of the arena sample (prompt-grouped folds,
             pref_lightning.data.folds, as `data.n_folds=5 data.fold=k` cuts them): every fold trains
             `experiment=arena_small` (the other arena rows plus the extra shared sets) with parts of it
             switched off in turn (--variants), beside baselines fitted here on the same folds: the class
             prior, the text-statistics logistic regression, LightGBM on the statistics (`bench` extra;
             skipped when not installed). Writes results/learning_real.json. The full grid (5 folds x 5
             variants, ~24 min per MiniLM epoch on 2 cores, ~5 min for arena rows only) is ~8.5 hours;
             --folds, --variants, --max-train-batches and --quick cut it down, --overrides makes it tiny
             (tests); runs of the same setting accumulate in the JSON, so the grid can be filled in parts
  real_split the older single split: MiniLM trained on the real rows of ../shared/data, validated on 400
             prompt-grouped arena rows, against the class prior and the statistics LR on that split
  recipe     the public notebooks' failing recipe (pretrained encoder, lr 2e-5 for backbone and head, fp16
             (Lightning runs 16-mixed as bf16 on CPU),
             dropout on, no warmup, no text statistics, tiny data): does PriorGuard flag it?

    python benchmarks/learning.py [--parts synthetic,real,real_split,recipe] [--quick]
    python benchmarks/learning.py --parts real --folds 0 --variants recipe,no_anchor --max-train-batches 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pref_lightning.core.metrics import CLASS_COLUMNS, PROB_FLOOR, class_prior, log_loss, prior_log_loss  # noqa: E402
from pref_lightning.data.folds import assign_folds, fold_split, grouped_split, prompt_key  # noqa: E402
from pref_lightning.data.records import label_array, read_records  # noqa: E402
from pref_lightning.data.text_stats import fit_logistic_regression, pair_stats_matrix, predict_proba  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
REUSE = False  # --reuse (run_real): read a fold run that already finished in the work folder instead of training
REAL_EXTRA = ["hh_rlhf_test.csv", "autoj_pairwise_test.csv", "pandalm_testset_v1.csv", "hhh_alignment.csv"]


def run_info(argv: list[str], precision: str = "32-true") -> dict:
    """Where and how a result was measured (`pref_lightning.core.runinfo`): date, commit, machine, precision, command."""
    from pref_lightning.core import runinfo

    return runinfo.run_info(precision, command="python " + " ".join(argv))


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


def part_real_split(work: Path, data_dir: Path, quick: bool, max_length: int, epochs: int,
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


# ---- real: 5-fold out-of-fold log loss on the arena sample, the recipe and its ablations --------------
ARENA = "lmsys_arena_sample.csv"
RECIPE = "arena_small"
N_FOLDS = 5
# the recipe (experiment=arena_small) with one part switched off in turn: name -> (what, overrides)
VARIANTS = {
    "recipe": ("experiment=arena_small as it is", []),
    "no_anchor": ("head not anchored on the statistics LR", ["model.anchor_head=false"]),
    "no_extra": ("arena rows only (no extra shared sets)", ["data.sources=[]"]),
    "with_extra": ("the extra shared sets mixed in as tie-aware sources (the recipe before 2026-12-04)",
                   ["<extra>"]),
    "ties_forced": ("every extra set treated as able to say tie (ties: true)", ["<ties_forced>"]),
    "extra_source_heads": ("the extra shared sets mixed in, each source with its own output layer over the shared "
                           "encoder and trunk (model.source_heads)", ["<extra>", "model.source_heads=true"]),
    "frozen_backbone": ("MiniLM frozen (backbone lr 0): head on fixed embeddings", ["model.lr=0"]),
}
DEFAULT_VARIANTS = "recipe,no_anchor,with_extra,ties_forced,frozen_backbone"
QUICK = {"folds": "0", "variants": "recipe,no_anchor", "max_train_batches": 60}


def recipe_sources(data_dir: Path, **extra) -> str:
    """`data.sources=[...]`: the recipe's extra sets (read from its experiment file) with `extra` keys set."""
    items = []
    for source in recipe_source_list(data_dir):
        source = {**source, **extra}
        items.append("{" + ",".join(f"{k}:'{v}'" if isinstance(v, str) else f"{k}:{str(v).lower()}"
                                    for k, v in source.items()) + "}")
    return f"data.sources=[{','.join(items)}]"


def variant_overrides(name: str, data_dir: Path, custom: dict[str, list[str]]) -> list[str]:
    if name in custom:
        return custom[name]
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {sorted(VARIANTS)} or an --add-variant name")
    special = {"<ties_forced>": lambda: recipe_sources(data_dir, ties=True), "<extra>": lambda: recipe_sources(data_dir)}
    return [special[o]() if o in special else o for o in VARIANTS[name][1]]


def arena_folds(data_dir: Path, seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    """The arena rows, their labels and their folds exactly as `data.n_folds=5` assigns them."""
    arena = read_records(data_dir / ARENA)
    labels = label_array(arena)
    return arena, labels, assign_folds([prompt_key(r) for r in arena], labels, N_FOLDS, seed)


def real_baselines(arena: list, labels: np.ndarray, folds: np.ndarray, fold_list: list[int]) -> dict:
    """Per-fold log loss of the baselines, fitted on the arena rows of the other folds."""
    X = pair_stats_matrix([(r.prompt, r.response_a, r.response_b) for r in arena])
    try:
        import lightgbm
    except ImportError:
        lightgbm = None
        print("real: lightgbm not installed (pip install -e '.[bench]'): no LightGBM baseline", flush=True)
    out: dict[str, dict[int, float]] = {"class_prior": {}, "stats_lr": {}, "stats_lr_cv": {}}
    if lightgbm is not None:
        out["stats_lightgbm"] = {}
    keys = [prompt_key(r) for r in arena]
    for k in fold_list:
        tr, va = fold_split(folds, k)
        out["class_prior"][k] = prior_log_loss(labels[tr], labels[va])
        lr = fit_logistic_regression(X[tr], labels[tr], l2=1e-2)
        out["stats_lr"][k] = log_loss(predict_proba(lr, X[va]), labels[va])
        # the same regression with its penalty chosen by 5-fold CV on the training rows (grouped by prompt),
        # as the anchored head chooses its own: a baseline at its best, not at a fixed 1e-2
        l2 = choose_lr_penalty(X[tr], labels[tr], [keys[i] for i in tr])
        out["stats_lr_cv"][k] = log_loss(predict_proba(fit_logistic_regression(X[tr], labels[tr], l2=l2), X[va]),
                                         labels[va])
        if lightgbm is not None:
            # fixed, conservative settings (no tuning on the folds scored here)
            gbm = lightgbm.LGBMClassifier(objective="multiclass", n_estimators=200, learning_rate=0.03,
                                          num_leaves=7, min_child_samples=20, subsample=0.8, subsample_freq=1,
                                          colsample_bytree=0.8, reg_lambda=1.0, n_jobs=2, random_state=0,
                                          verbose=-1)
            gbm.fit(X[tr], labels[tr])
            out["stats_lightgbm"][k] = log_loss(gbm.predict_proba(X[va]), labels[va])
    return out


def choose_lr_penalty(X: np.ndarray, y: np.ndarray, groups: list[str], grid=(0.01, 0.03, 0.1, 0.3, 1.0)) -> float:
    """The L2 penalty of `grid` with the lowest 5-fold log loss (folds grouped by `groups`, stratified)."""
    inner = assign_folds(groups, y, N_FOLDS, 0)
    losses = {}
    for l2 in grid:
        total = 0.0
        for k in range(N_FOLDS):
            tr, va = fold_split(inner, k)
            total += log_loss(predict_proba(fit_logistic_regression(X[tr], y[tr], l2=l2), X[va]), y[va]) * len(va)
        losses[l2] = total
    best = min(losses.values())
    return max(l2 for l2, loss in losses.items() if loss <= best + 1e-9)


ANCHOR_ABLATION = {
    # name: (what, data keys, fit_anchor options)
    "anchor": ("the anchor as it is: training-file rows, penalty by inner CV, [a, b, a-b, |a-b|], 16 statistics",
               {}, {}),
    "no_new_statistics": ("without refusal / overlap / identical (the 13 statistics before)",
                          {"stats_features": "legacy"}, {}),
    "no_absdiff": ("without |a - b| (features [a, b, a - b])", {}, {"features": "a,b,diff"}),
    "no_cv_penalty": ("L2 fixed at 1e-3 (before) instead of chosen by inner CV", {}, {"l2": 1e-3}),
    "all_rows": ("fitted on every training row, the extra sets included (tie-aware), as before", {"sources": True},
                 {"rows": "all"}),
    "before": ("all four off: the anchor of the previous session", {"stats_features": "legacy", "sources": True},
               {"features": "a,b,diff", "l2": 1e-3, "rows": "all"}),
}


def anchor_ablation(data_dir: Path, fold_list: list[int], seed: int) -> dict[str, dict]:
    """The anchored head's regression alone (the recipe at step 0), each of its parts switched off in turn,
    per fold: no training, so the whole table costs about a minute."""
    from pref_lightning.data.contract import LEGACY_STATS_FEATURES

    out = {}
    for name, (what, data, options) in ANCHOR_ABLATION.items():
        data = dict(data)
        if data.get("stats_features") == "legacy":
            data["stats_features"] = list(LEGACY_STATS_FEATURES)
        if data.pop("sources", False):
            data["sources"] = recipe_source_list(data_dir)
        out[name] = {"what": what, "per_fold": {str(k): v for k, v in
                                                anchor_baseline(data_dir, fold_list, seed, data=data,
                                                                options=options).items()}}
        print(f"anchor ablation: {name} {out[name]['per_fold']}", flush=True)
    return out


# the extra shared sets as the arena recipe mixed them until 2026-12-04 (HH-RLHF at a quarter), for the
# variants and ablations that put them back
EXTRA_SOURCES = [{"path": "${paths.data_dir}/hh_rlhf_test.csv", "weight": 0.25},
                 {"path": "${paths.data_dir}/autoj_pairwise_test.csv"},
                 {"path": "${paths.data_dir}/pandalm_testset_v1.csv"},
                 {"path": "${paths.data_dir}/hhh_alignment.csv"}]


def recipe_source_list(data_dir: Path) -> list[dict]:
    """The extra shared sets (`EXTRA_SOURCES`) as `data.sources` entries (paths resolved)."""
    return [{**s, "path": s["path"].replace("${paths.data_dir}", str(data_dir))} for s in EXTRA_SOURCES]


def anchor_baseline(data_dir: Path, fold_list: list[int], seed: int, max_length: int = 256,
                    data: dict | None = None, options: dict | None = None,
                    text_anchor: Path | None = None) -> dict[int, float]:
    """The recipe's model at step 0 per fold: its anchored head's statistics regression alone (the project's
    statistics and normalisation, penalty by inner CV, fitted on the fold's training arena rows), scored on
    the fold with swap TTA and the probability floor, as the step-0 validation pass scores it. Tokens are
    counted with the recipe's tokenizer (MiniLM when installed, else a tokenizer trained on the rows).
    `text_anchor`: a frozen stage-1 checkpoint whose text score joins the regression (`model.text_anchor`),
    through the same `stages` functions the training recipe calls; its tokenizer then encodes the rows."""
    from pref_lightning.core.errors import UserError
    from pref_lightning.data.datamodule import PreferenceDataModule
    from pref_lightning.data.tokenizers import cached_trained_tokenizer
    from pref_lightning.model.anchor import anchor_log_loss, fit_anchor_on
    from pref_lightning.model.backbone import load_tokenizer, resolve_backbone

    try:
        tokenizer = load_tokenizer(resolve_backbone("minilm"))
    except UserError:
        texts = [t for r in read_records(data_dir / ARENA) for t in (*r.prompt, *r.response_a, *r.response_b)]
        tokenizer = cached_trained_tokenizer(texts, 8000)
    score = None
    if text_anchor is not None:
        import torch

        from pref_lightning.data.tokenizers import tokenizer_from_files
        from pref_lightning.model.network import PreferenceNetwork
        from pref_lightning.model.stages import read_text_scorer

        settings, weights, files = read_text_scorer(text_anchor, "siamese")
        tokenizer = tokenizer_from_files(files)
        scorer = PreferenceNetwork.from_hparams(settings["hparams"], settings["backbone_config"])
        scorer.load_state_dict(weights)
        scorer.eval()
        torch.set_flush_denormal(True)

        def score(batch):
            return scorer({k: batch[k] for k in ("input_ids", "attention_mask")}, tta_swap=True)
    out = {}
    for k in fold_list:
        dm = PreferenceDataModule(train_path=str(data_dir / ARENA), n_folds=N_FOLDS, fold=k, split_seed=seed,
                                  max_length=max_length, batch_size=16, num_workers=0, **(data or {}))
        dm.attach_tokenizer(tokenizer)
        dm.setup("fit")
        val_a, val_b, val_labels = dm.split_statistics("val")
        columns = None
        if score is not None:
            from pref_lightning.model.stages import score_columns

            def columns(pairs, dm=dm):
                return score_columns(score, pairs, dm.collator(), 32)
            text_a, text_b = columns(dm.val_set.pairs)
            val_a, val_b = np.concatenate([val_a, text_a], 1), np.concatenate([val_b, text_b], 1)
        out[k] = anchor_log_loss(fit_anchor_on(dm, **(options or {}), side_columns=columns), val_a, val_b, val_labels,
                                 True, PROB_FLOOR)
        print(f"anchor fold {k}: {out[k]:.4f}", flush=True)
    return out


def run_fold(run_dir: Path, data_dir: Path, fold: int, overrides: list[str], max_batches: int | None,
             expected: tuple[list[str], np.ndarray, np.ndarray], recipe: str = RECIPE) -> dict:
    """Train experiment=arena_small on fold `fold`; its validation scores (checked to be on our fold)."""
    args = [f"experiment={recipe}", f"paths.data_dir={data_dir}", f"data.n_folds={N_FOLDS}", f"data.fold={fold}",
            "report=false", *overrides]
    if max_batches:
        args.append(f"trainer.limit_train_batches={max_batches}")
    if REUSE and (run_dir / "metrics.json").is_file() and (run_dir / "output.log").is_file():
        # --reuse: a finished run of this script in the work folder (an interrupted grid), read, not retrained;
        # the checks below still hold it to this fold, and its overrides to this variant's
        metrics = json.loads((run_dir / "metrics.json").read_text())
        ran = json.loads((run_dir / "run_command.json").read_text()) if (run_dir / "run_command.json").is_file() else None
        if ran is not None and ran != args:
            raise RuntimeError(f"{run_dir}: reused run was trained with {ran}, not {args}")
        seconds = float(metrics.get("wall_seconds", float("nan")))
        print(f"real: reusing {run_dir} (--reuse)", flush=True)
    else:
        metrics, out, seconds = train(run_dir, *args)
        (run_dir / "output.log").write_text(out)
        (run_dir / "run_command.json").write_text(json.dumps(args))
    ids, folds, labels = expected
    written = pd.read_csv(run_dir / "folds.csv", dtype={"id": str})
    if written["id"].tolist() != ids or not np.array_equal(written["fold"].to_numpy(), folds):
        raise RuntimeError(f"{run_dir}: the run's folds.csv differs from the folds the baselines use")
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    if sorted(oof["id"]) != sorted(i for i, f in zip(ids, folds) if f == fold):
        raise RuntimeError(f"{run_dir}: oof.csv does not hold exactly fold {fold}'s rows")
    return {"val_rows": metrics["val_rows"], "train_rows": metrics["train_rows"],
            "val_log_loss": metrics["val_log_loss"],
            # the temperature is fitted on these same rows: optimistic for the fold (one parameter, 200 rows)
            "val_log_loss_calibrated": metrics.get("val_log_loss_calibrated"),
            "temperature": metrics.get("temperature"), "baseline_log_loss": metrics.get("baseline_log_loss"),
            "val_accuracy": metrics["val_accuracy"], "warnings": metrics["warnings"], "seconds": round(seconds, 1)}


def oof_total(per_fold: dict, key: str | None = None) -> float | None:
    """Out-of-fold log loss over the folds present: the row-weighted mean of the folds' mean losses."""
    values = [(v if key is None else v.get(key), n) for v, n in per_fold.values()]
    if not values or any(v is None for v, _ in values):
        return None
    return float(sum(v * n for v, n in values) / sum(n for _, n in values))


def part_real(work: Path, data_dir: Path, fold_list: list[int], variants: list[str], max_batches: int | None,
              overrides: list[str], custom: dict[str, list[str]], previous: dict | None, seed: int = 42,
              recipe: str = RECIPE) -> dict:
    arena, labels, folds = arena_folds(data_dir, seed)
    ids = [r.id for r in arena]
    setting = {"recipe": f"experiment={recipe}", "max_train_batches": max_batches, "overrides": overrides,
               "n_folds": N_FOLDS, "split_seed": seed}
    result = previous if previous and previous.get("setting") == setting else {"setting": setting}
    if result is previous:
        print("real: adding to the results of the same setting in the output file", flush=True)
    result.setdefault("fold_rows", {})
    result.setdefault("baselines", {})
    result.setdefault("variants", {})
    for k in fold_list:
        result["fold_rows"][str(k)] = int((folds == k).sum())
    baselines = real_baselines(arena, labels, folds, fold_list)
    baselines["anchor_step0"] = anchor_baseline(data_dir, fold_list, seed)
    for name, scores in baselines.items():
        result["baselines"].setdefault(name, {"per_fold": {}})["per_fold"].update({str(k): v for k, v in scores.items()})
        print(f"real: {name} {scores}", flush=True)
    for name in variants:
        variant = variant_overrides(name, data_dir, custom)
        entry = result["variants"].setdefault(name, {"per_fold": {}})
        entry["what"] = "custom: " + " ".join(custom[name]) if name in custom else VARIANTS[name][0]
        entry["overrides"] = variant
        for k in fold_list:
            try:
                entry["per_fold"][str(k)] = run_fold(work / name / f"fold{k}", data_dir, k,
                                                     [*entry["overrides"], *overrides], max_batches,
                                                     (ids, folds, labels), recipe)
            except RuntimeError as error:  # one failed run does not lose the others
                entry["per_fold"][str(k)] = {"error": str(error)[-2000:]}
            print(f"real: {name} fold {k}: {entry['per_fold'][str(k)]}", flush=True)
    summarise_real(result)
    return result


def summarise_real(result: dict) -> None:
    """OOF totals (over the folds each row has) and, per variant, the folds where it is behind the LR."""
    rows = {k: int(n) for k, n in result["fold_rows"].items()}
    for entry in result["baselines"].values():
        entry["oof"] = oof_total({k: (v, rows[k]) for k, v in entry["per_fold"].items()})
        entry["folds"] = sorted(entry["per_fold"], key=int)
    lr = result["baselines"]["stats_lr"]["per_fold"]
    for entry in result["variants"].values():
        done = {k: v for k, v in entry["per_fold"].items() if "error" not in v}
        entry["folds"] = sorted(done, key=int)
        entry["oof"] = oof_total({k: (v, v["val_rows"]) for k, v in done.items()}, "val_log_loss")
        entry["oof_calibrated"] = oof_total({k: (v, v["val_rows"]) for k, v in done.items()},
                                            "val_log_loss_calibrated")
        entry["oof_stats_lr_same_folds"] = oof_total({k: (lr[k], rows[k]) for k in done if k in lr})
        # model.anchor_fallback (on by default): a fold that ends behind its step-0 baseline keeps the baseline,
        # whose validation loss is the run's baseline_log_loss (tested equal within 1e-4)
        if done and all(v.get("baseline_log_loss") is not None for v in done.values()):
            entry["oof_with_fallback"] = oof_total({k: (min(v["val_log_loss"], v["baseline_log_loss"]), v["val_rows"])
                                                    for k, v in done.items()})
            entry["folds_fallen_back"] = [k for k in entry["folds"] if done[k]["val_log_loss"] > done[k]["baseline_log_loss"]]
        entry["folds_behind_stats_lr"] = [k for k in entry["folds"] if k in lr and done[k]["val_log_loss"] > lr[k]]
        entry["seconds"] = round(sum(v["seconds"] for v in done.values()), 1)


def print_real(result: dict) -> None:
    folds = sorted(result["fold_rows"], key=int)
    s = result["setting"]
    print(f"\nreal, {s['n_folds']}-fold OOF on the arena sample ({s['recipe']}, max train batches "
          f"{s['max_train_batches'] or 'all'}, overrides {s['overrides'] or 'none'}); folds run: {', '.join(folds)}")
    print("| model | " + " | ".join(f"fold {k} ({result['fold_rows'][k]} rows)" for k in folds)
          + " | OOF | OOF calibrated (in-fold T) | OOF with anchor fallback | LR on the same folds | seconds |")
    print("|---|" + "---|" * (len(folds) + 5))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name, entry in result["baselines"].items():
        print(f"| {name} | " + " | ".join(fmt(entry["per_fold"].get(k)) for k in folds)
              + f" | {fmt(entry['oof'])} | - | - | - | - |")
    for name, entry in result["variants"].items():
        cells = []
        for k in folds:
            v = entry["per_fold"].get(k)
            cells.append("-" if v is None else "error" if "error" in v else fmt(v["val_log_loss"]))
        print(f"| {name} | " + " | ".join(cells) + f" | {fmt(entry['oof'])} | {fmt(entry['oof_calibrated'])} "
              f"| {fmt(entry.get('oof_with_fallback'))} | {fmt(entry['oof_stats_lr_same_folds'])} | {entry['seconds']} |")


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
    parser.add_argument("--parts", default="synthetic,recipe",
                        help="synthetic,real,real_split,recipe,anchor,blend,lexical,frozen_pca,selection (real is hours in full: "
                             "name it, with its knobs; anchor: the anchored head's ablation at step 0, ~1 min; lexical: "
                             "the anchor with lexical prompt-answer features, ~1 min; frozen_pca: the anchor with "
                             "principal components of frozen MiniLM side vectors, ~2 min; selection: the blend weight chosen on "
                             "the other folds, from a stored blend, seconds)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer rows: a few minutes in all (real: {QUICK}, unless given)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    # --parts real
    parser.add_argument("--folds", default=None, help="real: folds to run, e.g. 0,2 (default: all 5)")
    parser.add_argument("--variants", default=None,
                        help=f"real: recipe variants to train (default {DEFAULT_VARIANTS}; '' for baselines only)")
    parser.add_argument("--add-variant", action="append", default=[], metavar="NAME:OVERRIDE [OVERRIDE ...]",
                        help="real: a further variant of the recipe, e.g. 'len512:data.max_length=512'")
    parser.add_argument("--max-train-batches", type=int, default=None,
                        help="real: trainer.limit_train_batches of every run (default: the full epoch)")
    parser.add_argument("--overrides", default="", help="real: train.py overrides of every run (space-separated)")
    parser.add_argument("--work", type=Path, default=None, help="real: keep the runs here (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="real: a fold whose run folder in --work already holds a finished run (metrics.json, "
                             "output.log) is read instead of trained again (an interrupted grid)")
    parser.add_argument("--real-out", type=Path, default=REPO / "benchmarks" / "results" / "learning_real.json")
    parser.add_argument("--real-key", default="real", help="real: name of the result in --real-out")
    parser.add_argument("--recipe", default=RECIPE, help="real: the experiment every fold trains (default arena_small)")
    parser.add_argument("--text-anchor", type=Path, default=None,
                        help="anchor: a stage-1 checkpoint (model.text_anchor): the anchor with its text score")
    parser.add_argument("--blend-run", type=Path, action="append", default=[],
                        help="blend: a folder of fold runs (fold<k>/oof.csv) to blend with the step-0 anchor; "
                             "repeated: the runs' probabilities averaged (a seed ensemble), then blended")
    parser.add_argument("--text-anchor-label", default="stage1",
                        help="anchor: the name of that stage in --real-out (text_anchor:LABEL)")
    # --parts real_split
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--extra-files", default=",".join(REAL_EXTRA),
                        help="real_split: real files trained on beside the arena rows (comma-separated, in --data-dir)")
    parser.add_argument("--key", default="real", help="name of the real_split result in the JSON")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning.json")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="pref_learning_") as tmp:
        work = Path(tmp)
        if "synthetic" in parts:
            results["synthetic"] = part_synthetic(work, args.quick)
        if "real_split" in parts:
            extra = [f for f in args.extra_files.split(",") if f]
            results[args.key] = part_real_split(work, args.data_dir, args.quick, args.max_length, args.epochs, extra)
        if "recipe" in parts:
            results["recipe"] = part_recipe(work, args.data_dir)
        if "real" in parts:
            run_real(args, args.work or work / "real")
        if "anchor" in parts:
            run_anchor_ablation(args)
        if "blend" in parts:
            run_blend(args)
        for part in ("lexical", "frozen_pca"):
            if part in parts:
                run_anchor_features(args, part)
        if "selection" in parts:
            run_selection(args)
    if any(p in parts for p in ("synthetic", "real_split", "recipe")):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
    return 0


def run_anchor_ablation(args: argparse.Namespace) -> None:
    """`--parts anchor`: the table, into --real-out under "anchor_ablation" (with --text-anchor CKPT, the
    anchor with that stage's text score beside the statistics, under "text_anchor")."""
    folds = [int(k) for k in (args.folds or ",".join(map(str, range(N_FOLDS)))).split(",") if k]
    _, labels, fold_of = arena_folds(args.data_dir.resolve(), 42)
    if args.text_anchor:
        ckpt = args.text_anchor.resolve()
        table = {"anchor": {"what": "statistics alone (step 0 of the recipe without a text anchor)",
                            "per_fold": {str(k): v for k, v in anchor_baseline(args.data_dir.resolve(), folds, 42).items()}},
                 "text_anchor": {"what": f"statistics + the frozen stage's text score ({ckpt.name}, "
                                         f"{args.text_anchor_label or 'unlabelled'})",
                                 "per_fold": {str(k): v for k, v in anchor_baseline(
                                     args.data_dir.resolve(), folds, 42, text_anchor=ckpt).items()}}}
    else:
        table = anchor_ablation(args.data_dir.resolve(), folds, 42)
    rows = {str(k): int((fold_of == k).sum()) for k in folds}
    print("\n| anchor at step 0 | " + " | ".join(f"fold {k}" for k in rows) + " | OOF |")
    print("|---|" + "---|" * (len(rows) + 1))
    for name, entry in table.items():
        entry["oof"] = oof_total({k: (v, rows[k]) for k, v in entry["per_fold"].items()})
        print(f"| {name} | " + " | ".join(f"{entry['per_fold'][k]:.4f}" for k in rows) + f" | {entry['oof']:.4f} |")
    stored = json.loads(args.real_out.read_text()) if args.real_out.exists() else {}
    key = f"text_anchor:{args.text_anchor_label}" if args.text_anchor else "anchor_ablation"
    stored[key] = {**table, **({"run_info": run_info(sys.argv)} if args.text_anchor else {})}
    args.real_out.parent.mkdir(parents=True, exist_ok=True)
    args.real_out.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"written: {args.real_out} [{key}]")


def arena_fold_datamodule(data_dir: Path, fold: int, seed: int, tokenizer):
    """The arena sample's datamodule for `fold` of N_FOLDS (256 tokens a side, as the recipe), set up for fit."""
    from pref_lightning.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(train_path=str(data_dir / ARENA), n_folds=N_FOLDS, fold=fold, split_seed=seed,
                              max_length=256, batch_size=16, num_workers=0)
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def lexical_columns(arena: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-side lexical prompt-answer features of the arena rows (side A's (n, c), side B's (n, c)), each
    standardised over both sides: the Jaccard overlap of the prompt's and the answer's word sets (words of 3+
    letters or digits, lower-cased), the TF-IDF cosine of prompt and answer (scikit-learn, fitted on every
    prompt and answer text: no labels), and the TF-IDF cosine of the two answers (the same on both sides)."""
    import re

    from sklearn.feature_extraction.text import TfidfVectorizer

    word = re.compile(r"[a-z0-9]{3,}")

    def text(turns):
        return " ".join(t for t in turns if t and t != "<null>").lower()

    prompts = [text(r.prompt) for r in arena]
    answers = {"a": [text(r.response_a) for r in arena], "b": [text(r.response_b) for r in arena]}

    def jaccard(p, a):
        ps, as_ = set(word.findall(p)), set(word.findall(a))
        return len(ps & as_) / len(ps | as_) if ps | as_ else 0.0

    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2).fit(prompts + answers["a"] + answers["b"])
    vp, va, vb = (tfidf.transform(t) for t in (prompts, answers["a"], answers["b"]))

    def cosine(x, y):
        return np.asarray(x.multiply(y).sum(1)).ravel()

    jac = {s: np.array([jaccard(p, a) for p, a in zip(prompts, answers[s])]) for s in "ab"}
    tf_pa = {"a": cosine(vp, va), "b": cosine(vp, vb)}
    tf_ab = cosine(va, vb)
    sets = {"jaccard_prompt_answer": ([jac["a"]], [jac["b"]]),
            "tfidf_prompt_answer": ([tf_pa["a"]], [tf_pa["b"]]),
            "tfidf_prompt_answer_and_answers": ([tf_pa["a"], tf_ab], [tf_pa["b"], tf_ab]),
            "all_three": ([jac["a"], tf_pa["a"], tf_ab], [jac["b"], tf_pa["b"], tf_ab])}
    out = {}
    for name, (cols_a, cols_b) in sets.items():
        a, b = np.stack(cols_a, 1), np.stack(cols_b, 1)
        mean, std = np.concatenate([a, b]).mean(0), np.concatenate([a, b]).std(0) + 1e-9
        out[name] = ((a - mean) / std, (b - mean) / std)
    return out


def anchor_lexical(data_dir: Path, fold_list: list[int], seed: int = 42) -> dict[str, dict]:
    """`--parts lexical`: the anchored head's regression at step 0 (as `anchor_baseline`) with lexical
    prompt-answer features (`lexical_columns`) beside the statistics, per fold: does a cheap text feature in
    the anchor add what the statistics lack?"""
    from pref_lightning.model.anchor import anchor_log_loss, fit_anchor_on
    from pref_lightning.model.backbone import load_tokenizer, resolve_backbone

    arena, labels, _ = arena_folds(data_dir, seed)
    row_of = {r.id: i for i, r in enumerate(arena)}
    columns = lexical_columns(arena)
    tokenizer = load_tokenizer(resolve_backbone("minilm"))
    out: dict[str, dict] = {"statistics": {"what": "the anchor as it is (statistics alone)", "per_fold": {}}}
    out.update({name: {"what": f"statistics + {name.replace('_', ' ')}", "per_fold": {}} for name in columns})
    for k in fold_list:
        dm = arena_fold_datamodule(data_dir, k, seed, tokenizer)
        stats_a, stats_b, val_labels = dm.split_statistics("val")
        train_rows = np.array([row_of[i] for i in dm.train_ids])
        val_rows = np.array([row_of[i] for i in dm.val_ids])
        if not np.array_equal(labels[val_rows], val_labels):
            raise RuntimeError(f"fold {k}: the datamodule's validation rows differ from the arena rows")
        out["statistics"]["per_fold"][str(k)] = anchor_log_loss(fit_anchor_on(dm), stats_a, stats_b, val_labels,
                                                                True, PROB_FLOOR)
        for name, (col_a, col_b) in columns.items():
            def side_columns(pairs, col_a=col_a, col_b=col_b, train_rows=train_rows):
                if len(pairs) != len(train_rows):
                    raise RuntimeError("the anchor's rows are not the fold's training rows")
                return col_a[train_rows], col_b[train_rows]
            anchor = fit_anchor_on(dm, side_columns=side_columns)
            out[name]["per_fold"][str(k)] = anchor_log_loss(
                anchor, np.concatenate([stats_a, col_a[val_rows]], 1), np.concatenate([stats_b, col_b[val_rows]], 1),
                val_labels, True, PROB_FLOOR)
        print(f"lexical fold {k}: " + ", ".join(f"{n} {v['per_fold'][str(k)]:.4f}" for n, v in out.items()), flush=True)
    return out


def anchor_frozen_pca(data_dir: Path, fold_list: list[int], components: tuple[int, ...] = (8, 16, 32),
                      seed: int = 42) -> dict[str, dict]:
    """`--parts frozen_pca`: the anchored head's regression at step 0 (as `anchor_baseline`) with the first k
    principal components of frozen pretrained MiniLM side vectors (each side `[CLS] prompt [SEP] answer
    [SEP]` mean-pooled, as the recipe's head reads them at step 0) beside the statistics, per fold. The
    components are fitted on the fold's training sides (no labels), standardised on them; the regression's
    penalty is chosen by its own inner CV as always. Text in the anchor, computed once: does a linear read of
    the frozen encoder add what the statistics lack?"""
    import torch

    from pref_lightning.model.anchor import anchor_log_loss, fit_anchor_on
    from pref_lightning.model.backbone import build_backbone, load_tokenizer, resolve_backbone
    from pref_lightning.model.head import pool

    tokenizer = load_tokenizer(resolve_backbone("minilm"))
    encoder = build_backbone("minilm", vocab_size=len(tokenizer)).eval()
    vectors: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray]] = {}  # per encoded pair, computed once

    def side_vectors(pairs, collate) -> tuple[np.ndarray, np.ndarray]:
        todo = [p for p in pairs if (p.ids_a.tobytes(), p.ids_b.tobytes()) not in vectors]
        for start in range(0, len(todo), 32):
            chunk = todo[start:start + 32]
            batch = collate(chunk)
            with torch.no_grad():
                hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                pooled = pool(hidden, batch["attention_mask"], "mean").double().numpy()
            for i, p in enumerate(chunk):
                vectors[(p.ids_a.tobytes(), p.ids_b.tobytes())] = (pooled[i], pooled[len(chunk) + i])
        found = [vectors[(p.ids_a.tobytes(), p.ids_b.tobytes())] for p in pairs]
        return np.stack([a for a, _ in found]), np.stack([b for _, b in found])

    out: dict[str, dict] = {f"frozen_pca{k}": {"what": f"statistics + frozen MiniLM side vectors, PCA {k}",
                                               "per_fold": {}} for k in components}
    for fold in fold_list:
        dm = arena_fold_datamodule(data_dir, fold, seed, tokenizer)
        collate = dm.collator()
        train_a, train_b = side_vectors(dm.anchor_rows("train_file")["pairs"], collate)
        sides = np.concatenate([train_a, train_b])
        mean = sides.mean(0)
        basis = np.linalg.svd(sides - mean, full_matrices=False)[2]
        stats_a, stats_b, val_labels = dm.split_statistics("val")
        for k in components:
            scale = ((sides - mean) @ basis[:k].T).std(0)

            def side_columns(pairs, k=k, scale=scale, collate=collate, mean=mean, basis=basis):
                a, b = side_vectors(pairs, collate)
                return (a - mean) @ basis[:k].T / scale, (b - mean) @ basis[:k].T / scale
            anchor = fit_anchor_on(dm, side_columns=side_columns)
            val_a, val_b = side_columns(dm.val_set.pairs)
            out[f"frozen_pca{k}"]["per_fold"][str(fold)] = anchor_log_loss(
                anchor, np.concatenate([stats_a, val_a], 1), np.concatenate([stats_b, val_b], 1), val_labels, True, PROB_FLOOR)
        print(f"frozen pca fold {fold}: " + ", ".join(f"{n} {v['per_fold'][str(fold)]:.4f}" for n, v in out.items()),
              flush=True)
    return out


def run_anchor_features(args: argparse.Namespace, part: str) -> None:
    """`--parts lexical` (`anchor_lexical`, into --real-out under "anchor_lexical") or `--parts frozen_pca`
    (`anchor_frozen_pca`, under "anchor_frozen_pca"): the step-0 anchor with extra text columns, on the folds."""
    folds = [int(k) for k in (args.folds or ",".join(map(str, range(N_FOLDS)))).split(",") if k]
    _, _, fold_of = arena_folds(args.data_dir.resolve(), 42)
    key = f"anchor_{part}"
    table = {"lexical": anchor_lexical, "frozen_pca": anchor_frozen_pca}[part](args.data_dir.resolve(), folds)
    rows = {str(k): int((fold_of == k).sum()) for k in folds}
    for entry in table.values():
        entry["oof"] = oof_total({k: (v, rows[k]) for k, v in entry["per_fold"].items()})
        print(f"| {entry['what']} | " + " | ".join(f"{entry['per_fold'][k]:.4f}" for k in rows)
              + f" | {entry['oof']:.4f} |")
    stored = json.loads(args.real_out.read_text()) if args.real_out.exists() else {}
    stored[key] = {**table, "run_info": run_info(sys.argv)}
    args.real_out.parent.mkdir(parents=True, exist_ok=True)
    args.real_out.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"written: {args.real_out} [{key}]")


BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def anchor_blend(data_dir: Path, run_dirs: list[Path], fold_list: list[int],
                 seed: int = 42) -> dict[str, dict[str, float]]:
    """Per fold and weight w, the log loss of w * (the runs' validation probabilities, their oof.csv, averaged
    over the runs: one run, or a seed ensemble of the same folds) + (1 - w) * (the anchor's step-0
    probabilities, fitted as the run fits it): shrinking the trained model towards its baseline. Every
    weight is reported; none is chosen here."""
    import torch

    from pref_lightning.core.metrics import class_probabilities
    from pref_lightning.model.anchor import anchor_logits, fit_anchor_on
    from pref_lightning.model.backbone import load_tokenizer, resolve_backbone

    tokenizer = load_tokenizer(resolve_backbone("minilm"))
    out: dict[str, dict[str, float]] = {}
    for k in fold_list:
        dm = arena_fold_datamodule(data_dir, k, seed, tokenizer)
        stats_a, stats_b, labels = dm.split_statistics("val")
        anchor = class_probabilities(torch.from_numpy(anchor_logits(fit_anchor_on(dm), stats_a, stats_b)),
                                     floor=PROB_FLOOR).numpy()
        trained = np.mean([uncalibrated_oof(run_dir / f"fold{k}", dm.val_ids, labels) for run_dir in run_dirs], 0)
        out[str(k)] = {str(w): log_loss(w * trained + (1 - w) * anchor, labels) for w in BLEND_WEIGHTS}
        print(f"blend fold {k}: {out[str(k)]}", flush=True)
    return out


def uncalibrated_oof(fold_dir: Path, val_ids: list[str], labels: np.ndarray) -> np.ndarray:
    """(n, 3) validation probabilities of one fold run (FOLD_DIR/oof.csv, rows in `val_ids` order) with its
    calibration undone: oof.csv holds probabilities calibrated by a temperature fitted on this fold, so that
    nothing in a blend is fitted on the fold it is scored on. p = f + (1 - K f) softmax(z / T).
    Raises RuntimeError when its labels are not `labels`."""
    oof = pd.read_csv(fold_dir / "oof.csv", dtype={"id": str}).set_index("id").loc[val_ids]
    if not np.array_equal(oof["label"].to_numpy(), labels):
        raise RuntimeError(f"{fold_dir}/oof.csv: labels differ from the fold's validation rows")
    trained = oof[list(CLASS_COLUMNS)].to_numpy()
    temperature = json.loads((fold_dir / "metrics.json").read_text()).get("temperature", 1.0)
    floor, n_classes = PROB_FLOOR, trained.shape[1]
    raw = np.clip((trained - floor) / (1 - n_classes * floor), 1e-12, None) ** temperature
    return floor + (1 - n_classes * floor) * raw / raw.sum(1, keepdims=True)


def run_blend(args: argparse.Namespace) -> None:
    """`--parts blend --blend-run DIR [--blend-run DIR2 ...]`: `anchor_blend` of the fold runs in DIR
    (DIR/fold<k>/oof.csv; several folders: their probabilities averaged, a seed ensemble), into --real-out
    under "blend:<DIR name>" ("blend:<DIR name>+<DIR2 name>" for several)."""
    if not args.blend_run:
        raise SystemExit("error: --parts blend needs --blend-run DIR (a folder of fold runs)")
    folds = [int(k) for k in (args.folds or ",".join(map(str, range(N_FOLDS)))).split(",") if k]
    run_dirs = [run.resolve() for run in args.blend_run]
    per_fold = anchor_blend(args.data_dir.resolve(), run_dirs, folds)
    stored = json.loads(args.real_out.read_text()) if args.real_out.exists() else {}
    key = f"blend:{blend_name(run_dirs)}"
    what = "w * trained (oof.csv with its calibration undone"
    what += (f"; the mean of {len(run_dirs)} runs' probabilities" if len(run_dirs) > 1 else "") + ")"
    stored[key] = {"what": what + " + (1 - w) * step-0 anchor", "per_fold": per_fold, "run_info": run_info(sys.argv)}
    args.real_out.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"written: {args.real_out} [{key}]")


def other_fold_choice(per_fold: dict[str, dict[str, float]], fold_rows: dict[str, int]) -> dict:
    """Honest selection of the blend weight (issue 21): for each fold k, the weight of BLEND_WEIGHTS with the
    lowest log loss on the other folds (row-weighted), scored on fold k; so no fold's weight is chosen on the
    rows it is scored on. `per_fold` is a `blend:<run>` entry's {fold: {weight: log loss}}; returns
    {"per_fold": {fold: {"weight", "log_loss"}}, "oof"} (the OOF row-weighted over the folds given)."""
    folds = sorted(per_fold, key=int)
    if len(folds) < 2:
        raise SystemExit(f"error: the blend weight is chosen on the other folds: {len(folds)} fold(s) blended, "
                         "need 2 or more")
    chosen = {}
    for k in folds:
        others = [j for j in folds if j != k]

        def elsewhere(w: str, others=others) -> float:
            return sum(per_fold[j][w] * fold_rows[j] for j in others) / sum(fold_rows[j] for j in others)

        weight = min(per_fold[k], key=elsewhere)
        chosen[k] = {"weight": float(weight), "log_loss": per_fold[k][weight]}
    oof = sum(chosen[k]["log_loss"] * fold_rows[k] for k in folds) / sum(fold_rows[k] for k in folds)
    return {"per_fold": chosen, "oof": oof}


def blend_name(run_dirs: list[Path]) -> str:
    """The results-file name of a blend of these run folders: their names joined by '+'."""
    return "+".join(run.name for run in run_dirs)


def blend_fold_rows(run_dir: Path, folds: Iterable[str]) -> dict[str, int]:
    """{fold: validation rows} of the blended fold runs, counted in their own RUN_DIR/fold<k>/oof.csv (not
    taken from another entry of the results file, which may cover other folds). Raises SystemExit naming a
    missing file."""
    rows = {}
    for k in folds:
        path = run_dir / f"fold{k}" / "oof.csv"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: the blend's fold {k} needs its run's oof.csv")
        rows[str(k)] = len(pd.read_csv(path))
    return rows


def run_selection(args: argparse.Namespace) -> None:
    """`--parts selection --blend-run DIR [--blend-run DIR2 ...]`: `other_fold_choice` of the stored
    "blend:<name>" entry (`blend_name`), into --real-out under "selection:<name>" (no training; needs
    `--parts blend` with the same folders first)."""
    if not args.blend_run:
        raise SystemExit("error: --parts selection needs --blend-run DIR (the folder --parts blend read)")
    stored = json.loads(args.real_out.read_text())
    name = blend_name(args.blend_run)
    blend = stored.get(f"blend:{name}")
    if blend is None:
        runs = " ".join(f"--blend-run {run}" for run in args.blend_run)
        raise SystemExit(f"error: {args.real_out} has no 'blend:{name}': run --parts blend {runs}")
    fold_rows = blend_fold_rows(args.blend_run[0], blend["per_fold"])
    result = other_fold_choice(blend["per_fold"], fold_rows)
    stored[f"selection:{name}"] = {
        "what": "blend weight w (of " + ", ".join(map(str, BLEND_WEIGHTS)) + ") chosen per fold on the other "
                "folds' blend log losses, scored on the fold", **result, "run_info": run_info(sys.argv)}
    args.real_out.write_text(json.dumps(stored, indent=2) + "\n")
    for k, v in result["per_fold"].items():
        print(f"fold {k}: w={v['weight']} log loss {v['log_loss']:.4f}")
    print(f"OOF {result['oof']:.4f}; written: {args.real_out} [selection:{name}]")


def run_real(args: argparse.Namespace, work: Path) -> None:
    global REUSE
    REUSE = args.reuse
    quick = QUICK if args.quick else {}
    folds = args.folds if args.folds is not None else quick.get("folds", ",".join(map(str, range(N_FOLDS))))
    variants = args.variants if args.variants is not None else quick.get("variants", DEFAULT_VARIANTS)
    max_batches = args.max_train_batches if args.max_train_batches is not None else quick.get("max_train_batches")
    custom = {}
    for spec in args.add_variant:
        name, _, overrides = spec.partition(":")
        custom[name.strip()] = overrides.split()
    names = [v for v in variants.split(",") if v] + [n for n in custom if n not in variants.split(",")]
    stored = json.loads(args.real_out.read_text()) if args.real_out.exists() else {}
    result = part_real(work, args.data_dir.resolve(), [int(k) for k in folds.split(",") if k], names, max_batches,
                       args.overrides.split(), custom, stored.get(args.real_key), recipe=args.recipe)
    result["run_info"] = run_info(sys.argv)
    stored[args.real_key] = result
    args.real_out.parent.mkdir(parents=True, exist_ok=True)
    args.real_out.write_text(json.dumps(stored, indent=2) + "\n")
    print_real(result)
    print(f"written: {args.real_out} [{args.real_key}]")


def print_table(results: dict) -> None:
    if "synthetic" in results:
        print("\n| seed | val log loss | calibrated | prior | oracle | gap to oracle | accuracy | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["synthetic"]:
            print(f"| {r['seed']} | {r['val_log_loss']:.4f} | {r['val_log_loss_calibrated']:.4f} | {r['prior']:.4f} "
                  f"| {r['oracle']:.4f} | {r['gap_to_oracle']:+.4f} | {r['accuracy']:.3f} | {r['seconds']} |")
        print(f"worst gap to oracle: {max(r['gap_to_oracle'] for r in results['synthetic']):+.4f} (target <= 0.03)")
    for key in [k for k in results if k.startswith("real") and "val_rows" in results[k]]:
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
