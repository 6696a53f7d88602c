"""Regenerate the tables README.md and benchmarks/README.md quote from `benchmarks/results/*.json`.

Every table between `<!-- results:NAME -->` and `<!-- /results:NAME -->` is written by `RENDERERS[NAME]`
from the results files, so a published number always has a file behind it:

    python benchmarks/render_docs.py           # rewrite the tables in place
    python benchmarks/render_docs.py --check   # exit 1 (naming each table) when a table differs from its file

A marker whose NAME has no renderer, or a renderer whose results file is missing, is an error. To add a
table: a function results -> markdown in `RENDERERS`, and the two marker lines around it in the document.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCUMENTS = (REPO / "README.md", REPO / "benchmarks" / "README.md")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: a table cannot be published without its results file")
    return json.loads(path.read_text())


def f4(x: float) -> str:
    return f"{x:.4f}"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|" for row in rows]
    return "\n".join(lines) + "\n"


# ---- the tables ------------------------------------------------------------------------------------
def scale(_: Any = None) -> str:
    """benchmarks/README.md, Scale: the three datamodule builds of results/scale.json."""
    data = load("scale")
    runs, targets = data["runs"], data["targets"]

    def seconds(x: float) -> str:
        return "0" if x == 0 else f"{x:.1f}"

    target = {"nocache": "",
              "cold": f"<= {targets['cold_s']:g} s, <= {targets['peak_rss_mb'] / 1024:g} GB",
              "cached": f"<= {targets['cached_s']:g} s"}
    rows = [[label, seconds(runs[key]["wall_s"]), seconds(runs[key]["import_s"]), seconds(runs[key]["build_s"]),
             seconds(runs[key]["tokenize_s"]), f"{runs[key]['peak_rss_mb']:,}", target[key]]
            for key, label in (("nocache", "no cache"), ("cold", "cold (builds the cache)"), ("cached", "cached"))]
    return table(["run", "wall s (start to ready)", "of which imports", "build", "tokenize", "peak RSS MB", "target"],
                 rows)


def real_5fold(_: Any = None) -> str:
    """benchmarks/README.md, section 4: baselines and the recipe on the 5 arena folds (results/learning_real.json)."""
    real = load("learning_real")["real"]
    folds = [str(k) for k in range(real["setting"]["n_folds"])]
    sizes = [real["fold_rows"][k] for k in folds]
    base, recipe = real["baselines"], real["variants"]["recipe"]

    def row(label: str, per_fold: dict[str, float], oof: float, bold: bool = False) -> list[str]:
        total = f"**{f4(oof)}**" if bold else f4(oof)
        return [f"**{label}**" if bold else label, *(f4(per_fold[k]) for k in folds), total]

    fallen = set(recipe.get("folds_fallen_back", []))
    kept = {k: recipe["per_fold"][k]["baseline_log_loss"] if k in fallen else recipe["per_fold"][k]["val_log_loss"]
            for k in folds}
    trained = {k: recipe["per_fold"][k]["val_log_loss"] for k in folds}
    rows = [row("class prior", base["class_prior"]["per_fold"], base["class_prior"]["oof"]),
            row("text-statistics LR (l2 1e-2, the issue's baseline)", base["stats_lr"]["per_fold"], base["stats_lr"]["oof"]),
            row("text-statistics LR, penalty by inner CV (`stats_lr_cv`)", base["stats_lr_cv"]["per_fold"],
                base["stats_lr_cv"]["oof"]),
            row("LightGBM on the statistics", base["stats_lightgbm"]["per_fold"], base["stats_lightgbm"]["oof"]),
            row("the anchor alone: the recipe at step 0 (`anchor_step0`)", base["anchor_step0"]["per_fold"],
                base["anchor_step0"]["oof"]),
            row("recipe until 2026-12-04 (extra sets, one epoch), trained model as it ended", trained, recipe["oof"]),
            row("the same with `model.anchor_fallback` (chosen on the scored fold)", kept, recipe["oof_with_fallback"],
                bold=True)]
    return table(["model", *(f"fold {k}" for k in folds), f"OOF ({sum(sizes):,} rows)"], rows)


def anchor_ablation(_: Any = None) -> str:
    """benchmarks/README.md, section 4: the anchor's parts switched off in turn (results/learning_real.json)."""
    ablation = load("learning_real")["anchor_ablation"]
    folds = [str(k) for k in range(5)]
    labels = {"anchor": "as it is (training-file rows, penalty by inner CV, [a, b, a-b, \\|a-b\\|], 16 statistics)",
              "no_new_statistics": "without the new statistics (refusal, overlap, identical)",
              "no_absdiff": "without \\|a - b\\|",
              "no_cv_penalty": "L2 fixed at 1e-3 (before)",
              "all_rows": "fitted on every row, extra sets included (before)",
              "before": "all four off: the previous anchor"}
    rows = [[label, *(f4(ablation[key]["per_fold"][k]) for k in folds), f4(ablation[key]["oof"])]
            for key, label in labels.items()]
    return table(["anchor at step 0", *(f"fold {k}" for k in folds), "OOF"], rows)


def synthetic_seeds(_: Any = None) -> str:
    """benchmarks/README.md, Learning 1: the embedded default as configured now, per seed (results/synthetic_gap.json,
    variant `after`: `python train.py seed=S`)."""
    runs = load("synthetic_gap")["variants"]["after"]["runs"]
    rows = [[str(r["seed"]), f4(r["val_log_loss"]), f4(r["oracle_log_loss"]), f"{r['gap']:+.4f}",
             f"{r['val_accuracy']:.3f}", f"{r['train_wall_seconds']:.0f}"] for r in runs]
    return table(["seed", "val log loss", "oracle", "gap to oracle", "accuracy", "train seconds"], rows)


def synthetic_gap(_: Any = None) -> str:
    """benchmarks/README.md, Learning 1b: the embedded default's gap to the oracle per seed, before and after
    issue 21, with the ablations and the bounds (results/synthetic_gap.json)."""
    data = load("synthetic_gap")
    rows = []
    order = ["before", "after", *(n for n in data["variants"] if n not in ("before", "after"))]
    for name in (n for n in order if n in data["variants"]):
        variant = data["variants"][name]
        for r in variant["runs"]:
            rows.append([name, " ".join(variant["overrides"]) or "(defaults)", str(r["seed"]), f4(r["val_log_loss"]),
                         f4(r["oracle_log_loss"]), f"{r['gap']:+.4f}", f"{r['train_wall_seconds']:.0f}"])
    out = table(["variant", "overrides", "seed", "val log loss", "oracle", "gap", "train seconds"], rows)
    b = data.get("bounds")
    if b:
        out += "\n" + table([f"bound (5-fold CV, {b['rows']:,} rows)", "log loss"], [
            ["oracle", f4(b["oracle"])], ["regression on the planted scores", f4(b["regression_on_planted_scores"])],
            ["the same without the off-topic term (best topic-blind)", f4(b["regression_without_topic_term"])],
            ["text-statistics regression", f4(b["text_stats_regression"])], ["class prior", f4(b["prior"])]])
    diagnosis = data.get("diagnosis") or {}
    if diagnosis:  # synthetic_gap.py --diagnose: where a trained run's gap goes
        first = next(iter(diagnosis.values()))
        groups = list(first["groups"])
        out += "\n" + table([f"diagnosed run ({first['rows']:,} fresh rows, seed {first['seed']})", "expected gap",
                             *(f"{g} ({first['groups'][g]['rows']:,} rows): gap, share" for g in groups),
                             "topic-match AUC"],
                            [[name, f4(d["expected_gap"]),
                              *(f"{d['groups'][g]['expected_gap']:.4f}, {d['groups'][g]['share_of_gap']:.0%}"
                                for g in groups), f4(d["topic_match_auc"])] for name, d in diagnosis.items()])
    return out


def real_split(_: Any = None) -> str:
    """benchmarks/README.md, Learning 2: MiniLM on one arena split, all real sets vs the sets with ties
    (results/learning.json `real` and `real_tie_sets`)."""
    learning = load("learning")
    runs = [learning["real"], learning["real_tie_sets"]]
    titles = ["all real sets", "arena + Auto-J + PandaLM (sets with ties)"]
    header = [f"arena held-out prompts ({runs[0]['val_rows']} rows)"] + [
        f"{title}, {run['epochs']} epoch{'s' if run['epochs'] > 1 else ''} ({sum(run['train_rows'].values()):,} rows, "
        f"{run['seconds']:,.0f} s)" for title, run in zip(titles, runs)]
    arena_rows = runs[0]["train_rows"]["arena (train part)"]
    lines = [("class prior of the arena training rows", "prior_log_loss"),
             ("class prior of the training mix", "prior_mix_log_loss"),
             ("text-statistics logistic regression on the training mix", "text_stats_lr_log_loss"),
             (f"text-statistics logistic regression on the {arena_rows} arena rows", "text_stats_lr_arena_only_log_loss"),
             ("MiniLM siamese + hybrid head", "minilm_val_log_loss"),
             ("... + temperature fitted on this validation set (optimistic)", "minilm_val_log_loss_calibrated"),
             ("... + label-shift correction to the arena-train prior", "minilm_label_shift_log_loss")]
    return table(header, [[label, *(f4(run[key]) for run in runs)] for label, key in lines])


THROUGHPUT_SETUPS = {  # results key -> (label at batch 8, label at other batches)
    "hf_cross": ("(a) HF Trainer, cross, random", "(a)"),
    "pl_cross": ("(b) project, cross, length-grouped", "(b)"),
    "pl_siamese": ("(c) project, siamese, one (2B, L) call (before)", "(c)"),
    "pl_siamese_grouped": ("(d) project, siamese, sides in 4 length groups (default)", "(d)"),
    "pl_llama_lora": ("(e) as (d), tiny Llama + LoRA r=8", "(e)"),
}


def throughput(_: Any = None) -> str:
    """benchmarks/README.md, Throughput: every setup and batch size of results/throughput.json, with the
    speed-ups over (a), the HF Trainer recipe at the same batch size."""
    results = load("throughput")["results"]
    batches = sorted({int(b) for runs in results.values() for b in runs}, reverse=True)
    rows = []
    for batch in batches:
        baseline = results["hf_cross"].get(str(batch), {})
        for key, (label, short) in THROUGHPUT_SETUPS.items():
            run = results.get(key, {}).get(str(batch))
            if run is None:
                continue
            predict = run.get("predict_rows_per_s")
            rows.append([label if batch == batches[0] else short, str(batch), f"{run['train_rows_per_s']:.2f}",
                         f"{run['train_rows_per_s'] / baseline['train_rows_per_s']:.2f}",
                         f"{run['real_tokens_per_s']:,.0f}", f"{run['padding_efficiency']:.3f}",
                         f"{predict:.2f}" if predict else "",
                         f"{predict / baseline['predict_rows_per_s']:.2f}" if predict else "",
                         f"{run['peak_rss_mb']:,.0f}"])
    return table(["setup", "batch", "train rows/s", "x (a)", "real tok/s", "padding eff.", "predict rows/s", "x (a)",
                  "peak RSS MB"], rows, ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])


def stages(_: Any = None) -> str:
    """README.md / benchmarks/README.md: the stage levers on the arena folds (results/learning_real.json `stages`,
    `text_anchor:stage1_a`, `blend:s2_fresh`), every trained model as it ended (no fallback, one validation
    at the end, nothing chosen on the scored fold)."""
    real = load("learning_real")
    result, text, blend = real["stages"], real["text_anchor:stage1_a"], real.get("blend:s2_fresh", {})
    folds = [str(k) for k in range(5)]
    sizes = {k: result["fold_rows"][k] for k in folds}

    def oof(per_fold: dict[str, float]) -> str:
        if any(k not in per_fold or per_fold[k] is None for k in folds):
            return "-"
        return f4(sum(per_fold[k] * sizes[k] for k in folds) / sum(sizes.values()))

    def cells(per_fold: dict[str, float]) -> list[str]:
        return [f4(per_fold[k]) if per_fold.get(k) is not None else "-" for k in folds]

    def trained(name: str) -> dict[str, float]:
        runs = result["variants"].get(name, {}).get("per_fold", {})
        return {k: v["val_log_loss"] for k, v in runs.items() if isinstance(v, dict) and "val_log_loss" in v}

    lines = [("class prior", result["baselines"]["class_prior"]["per_fold"]),
             ("statistics LR, penalty by inner CV", result["baselines"]["stats_lr_cv"]["per_fold"]),
             ("anchor alone, statistics (step 0 of arena_small)", text["anchor"]["per_fold"]),
             ("anchor with stage 1's text score (`model.text_anchor`, step 0)", text["text_anchor"]["per_fold"]),
             ("stage 2 from stage 1's encoder (`model.init_from`), arena rows, as ended", trained("s2_init")),
             ("the same with stage 1's text score in the anchor (`arena_stages`), as ended", trained("s2_init_text")),
             ("fresh MiniLM, arena rows only, 2 epochs, as ended", trained("s2_fresh"))]
    if blend:
        lines.append(("fresh MiniLM as above, probabilities averaged 1:1 with its anchor",
                      {k: v["0.5"] for k, v in blend["per_fold"].items()}))
    rows = [[label, *cells(per_fold), oof(per_fold)] for label, per_fold in lines]
    return table(["model (5 arena folds, 2 CPU cores, fp32)", *(f"fold {k}" for k in folds),
                  f"OOF ({sum(sizes.values()):,} rows)"], rows)


def shown_sources(override: str) -> str:
    """A `data.sources=...` override as the sweep table shows it: the four extra shared sets by that name, a
    pseudo-labelled pool (a source with a teacher) with its files' names (folders dropped); others as they are."""
    if not override.startswith("data.sources="):
        return override
    if "teacher" not in override:
        return "data.sources=<the 4 extra sets>"
    return re.sub(r"'/[^']*/([^/']+)'", r"\1", override)  # quoted paths (Hydra's override grammar)


def sweep(_: Any = None) -> str:
    """benchmarks/README.md and README.md: the 2-fold proxy sweep of the arena recipe (results/learning_real.json
    `sweep`, `sweep_extra`, `sweep_lr1e5`, `sweep_head`, `sweep_head_extra`, `sweep_davidson`, and
    `blend:<variant>` for the blend with the anchor, `blend:<run>+<run>` for a seed ensemble), every run as it ended
    (`model.anchor_fallback=false model.anchor_blend=1.0`, one validation at the end); a variant confirmed on
    all five folds also shows its 5-fold OOF, alone, averaged 1:1 with its step-0 anchor, and blended with the
    weight each fold gets from the other folds (`selection:<variant>`: no weight chosen on the fold it scores)."""
    real = load("learning_real")
    folds = [str(k) for k in range(5)]
    result = real["sweep"]
    sizes = result["fold_rows"]
    stages = real["stages"]
    anchor = real["text_anchor:stage1_a"]["anchor"]["per_fold"]

    def mean(per_fold: dict[str, float], keys: list[str]) -> str:
        if any(per_fold.get(k) is None for k in keys):
            return "-"
        return f4(sum(per_fold[k] * sizes[k] for k in keys) / sum(sizes[k] for k in keys))

    def scores(entry: dict) -> dict[str, float]:
        return {k: v["val_log_loss"] for k, v in entry.get("per_fold", {}).items()
                if isinstance(v, dict) and "val_log_loss" in v}

    # (row label, the run's name in the blend: / selection: keys, overrides, per-fold log losses)
    lines = [("anchor alone, statistics (step 0)", None, "", anchor),
             ("recipe: lr 5e-5, 2 epochs (the `s2_fresh` runs of the stages table)", "s2_fresh", "",
              scores(stages["variants"]["s2_fresh"]))]
    for name, entry in result["variants"].items():
        lines.append((name, name, " ".join(entry["overrides"]), scores(entry)))
    # (key, overrides the runs were measured on top of, label suffix): sweep_extra on the lr 5e-5 recipe (the
    # section's text says so); the others after arena_small moved to lr 1e-5, the sweep_lr1e5 runs before it took
    # the Davidson head (so they pin the plain MLP head it had then)
    on_lr_1e5 = " (on the lr 1e-5 recipe)"
    for key, pins, suffix in (("sweep_extra", [], ""),
                              ("sweep_lr1e5", ["model.lr=1e-5", "model.symmetric_head=false"], on_lr_1e5),
                              ("sweep_head", ["model.lr=1e-5"], on_lr_1e5),
                              ("sweep_head_extra", ["model.lr=1e-5"], on_lr_1e5),
                              ("sweep_davidson", [], " (on the Davidson recipe)")):
        measured = real.get(key, {})
        trainer = [o for o in measured.get("setting", {}).get("overrides", []) if o.startswith("trainer.")]
        for name, entry in measured.get("variants", {}).items():
            overrides = [shown_sources(o) for o in entry["overrides"]]
            merged = {o.partition("=")[0]: o for o in [*pins, *overrides, *trainer]}  # a later value of a key wins
            lines.append((f"{name}{suffix}", name, " ".join(merged.values()), scores(entry)))
    # seed ensembles (`--parts blend` of several run folders: "blend:<run>+<run>"): the runs' probabilities
    # averaged (weight 1.0: the ensemble alone, as it ended), then blended like any run
    for key, blend in real.items():
        if key.startswith("blend:") and "+" in key:
            runs = key.removeprefix("blend:")
            lines.append((f"seed ensemble {' + '.join(runs.split('+'))} (probabilities averaged)", runs, "",
                          {k: v["1.0"] for k, v in blend["per_fold"].items()}))
    rows = []
    for label, run, overrides, per_fold in lines:
        shown = [(label, per_fold)]
        blend, selection = real.get(f"blend:{run}"), real.get(f"selection:{run}")
        if blend:
            shown.append((f"{label}, averaged 1:1 with its anchor", {k: v["0.5"] for k, v in blend["per_fold"].items()}))
        if selection:
            shown.append((f"{label}, blend weight chosen per fold on the other folds (w = "
                          + "/".join(f"{v['weight']:g}" for _, v in sorted(selection["per_fold"].items())) + ")",
                          {k: v["log_loss"] for k, v in selection["per_fold"].items()}))
        for name, values in shown:
            rows.append([name, f"`{overrides}`" if overrides else "",
                         *(f4(values[k]) if k in values else "-" for k in folds),
                         mean(values, ["0", "1"]), mean(values, folds)])
    return table(["variant (as ended)", "overrides", *(f"fold {k}" for k in folds), "folds 0-1", "OOF (5 folds)"], rows)


def anchor_lexical(_: Any = None) -> str:
    """benchmarks/README.md, Sweep: the anchor at step 0 with lexical prompt-answer features beside the
    statistics (results/learning_real.json `anchor_lexical`, `benchmarks/learning.py --parts lexical`), or
    with principal components of frozen MiniLM side vectors (`anchor_frozen_pca`, `--parts frozen_pca`)."""
    real = load("learning_real")
    # `--parts frozen_pca` (`anchor_frozen_pca`): principal components of frozen MiniLM side vectors instead
    entries = {**real["anchor_lexical"], **real.get("anchor_frozen_pca", {})}
    folds = [str(k) for k in range(5)]
    rows = [[entry["what"], *(f4(entry["per_fold"][k]) for k in folds), f4(entry["oof"])]
            for name, entry in entries.items() if name != "run_info"]
    return table(["anchor at step 0 (5 arena folds)", *(f"fold {k}" for k in folds), "OOF"], rows)


def gpu_check(_: Any = None) -> str:
    """benchmarks/README.md, GPU check: each stage of results/gpu_check.json."""
    data = load("gpu_check")
    machine = data["machine"]
    rows = []
    for run in data["results"]:
        for stage in run["stages"]:
            rows.append([run["run"], run["precision"], stage["stage"], f"{stage['seconds']:.1f}",
                         f"{stage['tokens_per_s']:,.0f}", f"{stage['peak_memory_gib']:.2f}",
                         str(stage["non_finite_losses"]), "yes" if run["ok"] else "no"])
    note = (f"{machine['gpu']}, torch {machine['torch']}, {machine['steps']} steps of batch {machine['batch_size']} "
            f"at {machine['max_length']} tokens\n\n")
    return note + table(["run", "precision", "stage", "seconds", "tokens/s", "peak GPU GiB", "non-finite losses", "ok"],
                        rows)


def scale_on_paper(_: Any = None) -> str:
    """README.md, Scale on paper: the estimates of results/scale_on_paper.json (benchmarks/scale_on_paper.py)."""
    data = load("scale_on_paper")
    lengths = sorted(data["recipes"][0]["at"], key=int)
    rows = []
    for recipe in data["recipes"]:
        params = data["models"][recipe["model"]]["params"]
        cells = []
        for n in lengths:
            at = recipe["at"][n]
            cells += [f"{at['memory_gib']:.0f}" + ("" if at["fits"] else " (over)"), f"{at['hours_per_10k_rows']:.2f}"]
        rows.append([recipe["recipe"], f"{params / 1e9:.2f}B", f"{recipe['trainable_params'] / 1e6:,.1f}M",
                     str(recipe["gpus"]), f"{recipe['rows']} ({recipe['layout']})",
                     f"{recipe['mfu']:.1%}" + (" (GPU check)" if recipe["mfu_source"].startswith("measured") else ""),
                     *cells])
    gpu = data["gpu"]
    note = (f"**Estimates, not measurements** ({gpu['name']}, {gpu['memory_gib']:.1f} GiB; memory per GPU in GiB at full "
            f"length, hours of wall time per 10,000 training rows; \"(over)\": more than the GPU's memory)\n\n")
    measured = data["gpu_check_mfu"]
    note += (f"MFU \"(GPU check)\": the utilisation `gpu_check.py` measured for the DeBERTa-v3-small shape on "
             f"{measured['gpu']} ({measured['tokens_per_s']:,.0f} tokens/s on rows of {measured['mean_sequence_tokens']:.0f} "
             f"tokens a side, {measured['batch_rows']} rows a batch), far from busy: those hours are upper bounds. "
             f"The other utilisations are assumptions.\n\n")
    header = ["recipe", "parameters", "trainable", "GPUs", "rows per step", "MFU"]
    for n in lengths:
        header += [f"GiB @ {int(n):,}", f"h / 10k rows @ {int(n):,}"]
    return note + table(header, rows)


def timings(_: Any = None) -> str:
    """README.md, Timings: results/timings.json (benchmarks/timings.py)."""
    data = load("timings")
    rows = []
    if "embedded_default" in data:
        run = data["embedded_default"]
        rows.append([f"`{run['command']}` (embedded default)", f"{run['wall_seconds']:.0f} s",
                     f"val log loss {f4(run['val_log_loss'])} ({f4(run['val_log_loss_calibrated'])} calibrated), "
                     f"oracle {f4(run['oracle_log_loss'])}, gap {run['val_log_loss'] - run['oracle_log_loss']:+.3f}; "
                     f"{run['date']}, {run['commit']}"])
    if "suite" in data:
        run = data["suite"]
        rows.append([f"`{run['command']}` (the whole suite, as `.ci/run`)", f"{run['wall_seconds'] / 60:.1f} min",
                     f"{run['closing_line']}; {run['date']}, {run['commit']}"])
    return table(["command", "wall time", "result"], rows)


RENDERERS: dict[str, Callable[[Any], str]] = {
    "timings": timings,
    "stages": stages,
    "sweep": sweep,
    "anchor_lexical": anchor_lexical,
    "gpu_check": gpu_check,
    "scale_on_paper": scale_on_paper,
    "throughput": throughput,
    "synthetic_seeds": synthetic_seeds,
    "synthetic_gap": synthetic_gap,
    "real_split": real_split,
    "scale": scale,
    "real_5fold": real_5fold,
    "anchor_ablation": anchor_ablation,
}


# ---- rewriting and checking --------------------------------------------------------------------------
def render(text: str, where: str) -> tuple[str, list[str]]:
    """`text` with every marked table regenerated, and the names of those that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise SystemExit(f"error: {where}: no renderer for <!-- results:{name} --> (known: {', '.join(RENDERERS)})")
        body = RENDERERS[name](None)
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs from its file")
    args = parser.parse_args(argv)
    drift = []
    for path in DOCUMENTS:
        text = path.read_text()
        new, changed = render(text, str(path.relative_to(REPO)))
        drift += [f"{path.relative_to(REPO)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if args.check and drift:
        print("tables that differ from their results files (python benchmarks/render_docs.py rewrites them):\n  "
              + "\n  ".join(drift), file=sys.stderr)
        return 1
    print(("rewrote " if drift else "up to date: ") + (", ".join(drift) if drift else "every table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
