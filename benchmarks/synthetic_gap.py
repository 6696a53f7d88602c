"""Synthetic gap benchmark (issue 21, part "Synthetic"): how far the embedded default (`python train.py`) ends
from the oracle of its synthetic rows, per training seed, for the recipe before issue 21, each step since and now.

Writes benchmarks/results/synthetic_gap.json. Parts (CPU, offline):
  bounds    on the embedded default's 40,000 synthetic rows (seed 0), 5-fold CV: the oracle, the best model
            that cannot see whether an answer is about the prompt's topic (a logistic regression on the planted
            scores with the off-topic term removed), the same regression with it (~ the oracle), and the
            text-statistics regression (`synthetic.text_stats_log_loss`): what the topic term is worth
  runs      `python train.py seed=S` for each variant (VARIANTS: the recipe before, the recipe now, ablations)
            and seed: val log loss, oracle, gap, wall seconds; the worst gap per variant against the 0.05 target
  --diagnose VARIANT:RUN_DIR   where a trained run's gap goes (`diagnose`): expected gap per row group on fresh
            rows, and how well the interaction's prompt-answer cosine tells on-topic answers from off-topic ones

Runs accumulate in the JSON (a variant's seeds replace only themselves), so variants can be measured in parts:

    python benchmarks/synthetic_gap.py                                   # bounds + before/after, seeds 0,1,2
    python benchmarks/synthetic_gap.py --parts runs --variants no_interaction --seeds 0
    python benchmarks/synthetic_gap.py --parts none --collect after:0:RUN_DIR --diagnose default_on_seed_3:RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # noqa: E402  (benchmarks/learning.py: its train() runs train.py)

RESULTS = REPO / "benchmarks" / "results" / "synthetic_gap.json"
TARGET_GAP = 0.05
QUIET = ["report=false"]  # learning.train adds the progress-bar and summary switches


def pinned(*parts: list[str]) -> list[str]:
    """Override lists merged key by key, later ones winning (Hydra refuses a key given twice)."""
    merged: dict[str, str] = {}
    for part in parts:
        for override in part:
            key, _, value = override.partition("=")
            merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


# Earlier embedded defaults, pinned, so that every stored run keeps the settings it was measured with:
# relative-position attention, batch 32, lr 3e-3, no symmetric head, 20,000 rows until 2026-12-05 noon
ONE_LAYER_20K = ["model.tiny_config.relative_attention=true", "model.tiny_config.position_biased_input=false",
                 "model.tiny_config.pos_att_type=[p2c,c2p]", "model.tiny_config.norm_rel_ebd=layer_norm",
                 "model.symmetric_head=false", "model.lr=3e-3",
                 "model.head_lr=3e-3", "data.batch_size=32", "data.synthetic_rows=20000"]
RELATIVE = ONE_LAYER_20K[:4]  # DeBERTa-v3's relative-position attention (tiny.yaml's)
# 2 layers on 10,000 rows until 2026-12-05 morning (the interaction, then the relevance loss, were added on top of it)
TWO_LAYERS_10K = pinned(ONE_LAYER_20K, ["model.tiny_config.num_hidden_layers=2", "data.synthetic_rows=10000"])
# the interaction without the relevance loss (the default of 2026-12-04 evening)
INTERACTION_DEFAULT = pinned(TWO_LAYERS_10K, ["model.relevance_weight=0.0"])
# the recipe before issue 21 (no interaction, lr 1e-3)
BEFORE = pinned(INTERACTION_DEFAULT, ["model.interaction=none", "model.lr=1e-3", "model.head_lr=1e-3"])
# the equivariant MLP head (model.symmetric_head=true) on the default's other settings: the embedded default of
# 2026-12-05 afternoon, before the Davidson head (every screen made on it pins it)
SYMMETRIC_MLP = ["model.symmetric_head=true"]
VARIANTS: dict[str, list[str]] = {
    "before": BEFORE,
    # the embedded default as configured now: 1 layer with absolute positions, 40,000 rows in batches of 64,
    # the Davidson head (symmetric_head=davidson), lr 6e-3, interaction + relevance loss
    "after": [],
    "default_on_seed_3": [],  # the embedded default itself on the screening seed (3, not a scored seed)
    # the default of 2026-12-05 afternoon: the same with the equivariant MLP head (seeds 0-2, and 3 screened)
    "absolute_positions_40k": SYMMETRIC_MLP,
    # the steps that led here, each as it was measured
    "interaction_only": INTERACTION_DEFAULT,
    "interaction_relevance_two_layers": TWO_LAYERS_10K,  # the default of 2026-12-05 morning
    "one_layer_10k_rows": pinned(ONE_LAYER_20K, ["data.synthetic_rows=10000"]),
    "one_layer_20k_rows": ONE_LAYER_20K,  # the default of 2026-12-05 noon
    # the screening that chose the new default, on seed 3 (not a scored seed): from the noon default, then with
    # relative-position attention (2.4x the step time) swapped for absolute positions and the rows that buys
    "one_layer_20k_rows_symmetric": pinned(ONE_LAYER_20K, ["model.symmetric_head=true"]),
    "relative_positions_batch_64_lr_4e-3": pinned(RELATIVE, ["model.lr=4e-3", "model.head_lr=4e-3",
                                                            "data.synthetic_rows=20000"]),
    "relative_positions_batch_64_lr_4e-3_26k_rows": pinned(RELATIVE, ["model.lr=4e-3", "model.head_lr=4e-3",
                                                                     "data.synthetic_rows=26000"]),
    "lr_4e-3": pinned(SYMMETRIC_MLP, ["model.lr=4e-3", "model.head_lr=4e-3"]),
    "batch_32_lr_3e-3": pinned(SYMMETRIC_MLP, ["data.batch_size=32", "model.lr=3e-3", "model.head_lr=3e-3"]),
    "batch_48_lr_4e-3_44k_rows": pinned(SYMMETRIC_MLP, ["data.batch_size=48", "model.lr=4e-3", "model.head_lr=4e-3",
                                                        "data.synthetic_rows=44000"]),
    "two_layers_lr_4e-3_28k_rows": pinned(SYMMETRIC_MLP, ["model.tiny_config.num_hidden_layers=2", "model.lr=4e-3",
                                                          "model.head_lr=4e-3", "data.synthetic_rows=28000"]),
    # screening around the afternoon default (absolute_positions_40k) on seed 3: each one change; none beat it
    "lr_1e-2": pinned(SYMMETRIC_MLP, ["model.lr=1e-2", "model.head_lr=1e-2"]),
    "relevance_0.5": pinned(SYMMETRIC_MLP, ["model.relevance_weight=0.5"]),
    "relevance_temperature_0.05": pinned(SYMMETRIC_MLP, ["model.relevance_temperature=0.05"]),
    "relevance_temperature_0.2": pinned(SYMMETRIC_MLP, ["model.relevance_temperature=0.2"]),
    "batch_128_lr_1e-2": pinned(SYMMETRIC_MLP, ["data.batch_size=128", "model.lr=1e-2", "model.head_lr=1e-2"]),
    # the token embeddings at twice / half the layer's LR (model.layer_lr_decay: depth 0 gets lr * decay)
    "embeddings_lr_x2": pinned(SYMMETRIC_MLP, ["model.layer_lr_decay=2.0"]),
    "embeddings_lr_x0.5": pinned(SYMMETRIC_MLP, ["model.layer_lr_decay=0.5"]),
    "head_hidden_512": pinned(SYMMETRIC_MLP, ["model.head_hidden=512"]),
    "prompt_fraction_0.4": pinned(SYMMETRIC_MLP, ["data.prompt_fraction=0.4"]),
    # an exponential moving average of the weights (Lightning's EMAWeightAveraging) read at validation
    "ema_0.99": pinned(SYMMETRIC_MLP, ["+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
                                       "+callbacks.ema.decay=0.99"]),
    # ablations of the earlier defaults (each with one part switched back or moved)
    "no_interaction": pinned(INTERACTION_DEFAULT, ["model.interaction=none"]),
    "interaction_lr_1e-3": pinned(INTERACTION_DEFAULT, ["model.lr=1e-3", "model.head_lr=1e-3"]),
    "interaction_last_hidden_lr_1e-3": pinned(INTERACTION_DEFAULT, ["model.interaction=prompt_answer", "model.lr=1e-3",
                                                                     "model.head_lr=1e-3"]),
    "max_length_64_two_epochs": pinned(INTERACTION_DEFAULT, ["data.max_length=64", "trainer.max_epochs=2"]),
    "relevance_0.05": pinned(TWO_LAYERS_10K, ["model.relevance_weight=0.05"]),
    "relevance_1.0": pinned(TWO_LAYERS_10K, ["model.relevance_weight=1.0"]),
    "one_layer_two_epochs_10k_rows": pinned(ONE_LAYER_20K, ["data.synthetic_rows=10000", "trainer.max_epochs=2"]),
    # the control that tells capacity from mechanism: the pretrained all-MiniLM-L6-v2 (22M parameters, offline
    # extra `minilm`) with its own model config (no interaction, lr 5e-5, head lr 1e-3) on 10,000 rows
    "minilm_control": ["model=minilm", "data.synthetic_rows=10000", "data.batch_size=32"],
}


def run_info(argv: list[str]) -> dict:
    """Where and how the numbers were measured (`pref_lightning.core.runinfo`)."""
    from pref_lightning.core import runinfo

    return runinfo.run_info("32-true", command="python " + " ".join(argv))


def bounds(rows: int = 40_000, seed: int = 0) -> dict[str, float]:
    """Reference log losses of the embedded default's synthetic rows (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from pref_lightning.core.metrics import log_loss
    from pref_lightning.data import synthetic

    data = synthetic.generate(rows, seed=seed)
    lat, y = data.latents, data.labels
    s_a, s_b = lat["score_a"].to_numpy(), lat["score_b"].to_numpy()
    identical = lat["identical"].to_numpy(dtype=float)

    def cv(a: np.ndarray, b: np.ndarray) -> float:
        d = a - b
        x = np.c_[d, np.abs(d), identical, np.minimum(a, b), np.maximum(a, b)]
        p = cross_val_predict(LogisticRegression(C=10, max_iter=2000), x, y, cv=5, method="predict_proba")
        return float(log_loss(p, y))

    off = {side: (lat[f"off_topic_{side}"].to_numpy(dtype=float) * (lat[f"kind_{side}"] == "text").to_numpy())
           for side in "ab"}
    w = synthetic._W_OFF_TOPIC
    return {"rows": rows, "seed": seed, "oracle": round(data.oracle_log_loss, 4),
            "regression_on_planted_scores": round(cv(s_a, s_b), 4),
            "regression_without_topic_term": round(cv(s_a - w * off["a"], s_b - w * off["b"]), 4),
            "text_stats_regression": round(synthetic.text_stats_log_loss(data.frame), 4),
            "prior": round(synthetic.prior_log_loss(y, y), 4),
            "rows_with_one_answer_off_topic": round(float(((off["a"] + off["b"]) == 1).mean()), 4)}


def train(run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    """`learning.train` (one train.py run, its metrics.json and wall seconds), without the report."""
    metrics, _, seconds = learning.train(run_dir, *QUIET, *overrides)
    return metrics, seconds


def diagnose(checkpoint: Path, rows: int = 4000, seed: int = 77) -> dict:
    """Where a trained model's gap goes, on fresh rows of the same generator (seed 77: rows no run trained or
    validated on), as `predict.py` scores them: the expected gap (mean KL(p_true || p), nats: the gap to the
    oracle without the label draw's noise) in all and per row group, with each group's share of it; and how
    well the cosine that `model.interaction` computes (prompt vs answer, mean input token embeddings, each
    side encoded as in training) ranks on-topic answers above off-topic ones (AUC over text answers)."""
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from pref_lightning.data import synthetic
    from pref_lightning.data.pairs import PairEncoder
    from pref_lightning.data.records import records_from_frame
    from pref_lightning.model.head import mean_pool, segment_masks
    from pref_lightning.model.module import PreferenceModule

    data = synthetic.generate(rows, seed=seed)
    frame, lat = data.frame, data.latents
    with tempfile.TemporaryDirectory(prefix="diagnose_") as work:
        test, out = Path(work) / "test.csv", Path(work) / "submission.csv"
        synthetic.write_csv(frame[["id", "prompt", "response_a", "response_b"]], test)
        subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt_path={checkpoint}", f"input_path={test}",
                        f"output_path={out}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"],
                       check=True, cwd=REPO, capture_output=True)
        predicted = pd.read_csv(out)[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    true = data.true_proba
    kl = (true * (np.log(true) - np.log(predicted))).sum(1)
    off = lat["off_topic_a"].to_numpy() | lat["off_topic_b"].to_numpy()
    groups = {"an answer off the prompt's topic": off, "both answers on topic": ~off,
              "multi-turn": lat["n_turns"].to_numpy() > 1,
              "a refusal": lat["refusal_a"].to_numpy() | lat["refusal_b"].to_numpy()}
    by_group = {name: {"rows": int(mask.sum()), "expected_gap": round(float(kl[mask].mean()), 4),
                       "share_of_gap": round(float(kl[mask].sum() / kl.sum()), 3)} for name, mask in groups.items()}

    module, tokenizer, spec = PreferenceModule.from_checkpoint(str(checkpoint))
    pairs = PairEncoder(tokenizer, spec).encode(records_from_frame(frame, "diagnose", require_labels=False))
    cosines, on_topic = [], []
    embeddings = module.backbone.get_input_embeddings()
    with torch.no_grad():
        for row, pair in enumerate(pairs):
            for side, ids in (("a", pair.ids_a), ("b", pair.ids_b)):
                if lat[f"kind_{side}"][row] != "text":
                    continue
                ids = torch.as_tensor(ids, dtype=torch.long)[None]
                prompt, answer = segment_masks(ids, torch.ones_like(ids))
                states = embeddings(ids).float()
                cosines.append(float(F.cosine_similarity(mean_pool(states, prompt), mean_pool(states, answer))))
                on_topic.append(not lat[f"off_topic_{side}"][row])
    return {"checkpoint": str(checkpoint), "rows": rows, "seed": seed, "expected_gap": round(float(kl.mean()), 4),
            "groups": by_group, "topic_match_auc": round(float(roc_auc_score(on_topic, cosines)), 4)}


def run_variant(name: str, seeds: list[int], work: Path, extra: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        metrics, seconds = train(work / f"{name}_{seed}", [f"seed={seed}", *VARIANTS[name], *extra])
        rows.append({"seed": seed, "val_log_loss": round(metrics["val_log_loss"], 4),
                     "oracle_log_loss": round(metrics["oracle_log_loss"], 4),
                     "gap": round(metrics["val_log_loss"] - metrics["oracle_log_loss"], 4),
                     "val_accuracy": round(metrics["val_accuracy"], 4),
                     "train_wall_seconds": metrics.get("wall_seconds"), "process_seconds": round(seconds, 1)})
        print(f"{name} seed {seed}: {rows[-1]}", flush=True)
    return rows


def collected(seed: int, folder: Path) -> dict:
    """A run's row from its metrics.json (train.py wrote it; `run_info` says which commit and command)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    command = metrics.get("run_info", {}).get("command", "")
    if f"seed={seed}" not in command:
        raise SystemExit(f"error: {folder}/metrics.json was not trained with seed={seed} (command: {command})")
    return {"seed": seed, "val_log_loss": round(metrics["val_log_loss"], 4),
            "oracle_log_loss": round(metrics["oracle_log_loss"], 4),
            "gap": round(metrics["val_log_loss"] - metrics["oracle_log_loss"], 4),
            "val_accuracy": round(metrics["val_accuracy"], 4), "train_wall_seconds": metrics.get("wall_seconds"),
            "process_seconds": None, "collected_from": str(folder), "run_info": metrics.get("run_info")}


def summarise(runs: list[dict]) -> dict:
    gaps = [r["gap"] for r in runs]
    return {"worst_gap": max(gaps), "mean_gap": round(float(np.mean(gaps)), 4),
            "max_train_wall_seconds": max(r["train_wall_seconds"] or 0 for r in runs),
            "meets_target": bool(max(gaps) <= TARGET_GAP)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bounds,runs")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides (tests: tiny runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--collect", nargs="*", default=[], metavar="VARIANT:SEED:RUN_DIR",
                        help="record a run already made (`python train.py seed=SEED <the variant's overrides>` into "
                             "RUN_DIR) instead of training it again: its metrics.json is read as is")
    parser.add_argument("--diagnose", nargs="*", default=[], metavar="VARIANT:RUN_DIR",
                        help="where a trained run's gap goes (diagnose(); RUN_DIR/checkpoints/best.ckpt), stored "
                             "under `diagnosis` with the variant it was trained as")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    # what this invocation measures; merged into the file only when written (runs of other invocations that
    # finished meanwhile are kept)
    out: dict = {"variants": {}}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "bounds" in parts:
        out["bounds"] = bounds()
        print("bounds:", out["bounds"], flush=True)
    if "runs" in parts:
        seeds = [int(s) for s in args.seeds.split(",")]
        with tempfile.TemporaryDirectory(prefix="synthetic_gap_") as work:
            for name in args.variants.split(","):
                kept = [r for r in previous.get("variants", {}).get(name, {}).get("runs", []) if r["seed"] not in seeds]
                runs = sorted(kept + run_variant(name, seeds, Path(work), args.overrides), key=lambda r: r["seed"])
                out["variants"][name] = {"overrides": VARIANTS[name] + args.overrides, "runs": runs,
                                         **summarise(runs), "run_info": run_info(["benchmarks/synthetic_gap.py", *argv])}
    for item in args.collect:
        name, seed, folder = item.split(":", 2)
        if name not in VARIANTS:
            parser.error(f"--collect {item}: unknown variant {name!r}")
        row = collected(int(seed), Path(folder))
        kept = [r for r in out["variants"].get(name, previous.get("variants", {}).get(name, {})).get("runs", [])
                if r["seed"] != int(seed)]
        runs = sorted([*kept, row], key=lambda r: r["seed"])
        out["variants"][name] = {"overrides": VARIANTS[name], "runs": runs, **summarise(runs),
                                 "run_info": row.pop("run_info")}
    for item in args.diagnose:
        name, folder = item.split(":", 1)
        if name not in VARIANTS:
            parser.error(f"--diagnose {item}: unknown variant {name!r}")
        out.setdefault("diagnosis", {})[name] = diagnose(Path(folder) / "checkpoints" / "best.ckpt")
        print(f"diagnosis {name}: {out['diagnosis'][name]}", flush=True)
    merged = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged.setdefault("variants", {}).update(out["variants"])
    merged.setdefault("diagnosis", {}).update(out.get("diagnosis", {}))
    if "bounds" in out:
        merged["bounds"] = out["bounds"]
    merged["target_gap"] = TARGET_GAP
    merged["run_info"] = run_info(["benchmarks/synthetic_gap.py", *argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    for name, variant in merged["variants"].items():
        print(f"{name:28s} worst gap {variant['worst_gap']:.4f} mean {variant['mean_gap']:.4f} "
              f"target {'met' if variant['meets_target'] else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
