"""`RUN/report.md` at the end of training: config, data sizes, metrics vs the class prior, wall time and
PNG plots (`RUN/plots/`): learning curves, a reliability diagram, a confusion matrix and histograms of
the predicted probabilities. Everything is written atomically; matplotlib draws headless (no pyplot)."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pref_lightning.core.atomic import atomic_path, atomic_write_text
from pref_lightning.core.metrics import CLASS_LABELS, gain_over

PLOTS = ("curves", "reliability", "confusion", "probabilities")
# CSVLogger columns drawn on the curves plot, with their legend names
CURVES = {"train/loss": "train loss (per logged step)", "train/log_loss": "train log loss (per epoch)",
          "val/log_loss": "val log loss (per validation)"}


# ---- numbers --------------------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: rows binned by their highest probability; |confidence - accuracy| weighted by bin size."""
    mean_p, freq, counts = reliability_curve(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)
    return float((counts * np.abs(mean_p - freq)).sum() / max(1, counts.sum()))


def reliability_curve(p: np.ndarray, hit: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin of `p`: mean predicted probability, observed frequency of `hit`, row count."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    keep = counts > 0
    mean_p = np.bincount(which, weights=p, minlength=bins)[keep] / counts[keep]
    freq = np.bincount(which, weights=hit.astype(float), minlength=bins)[keep] / counts[keep]
    return mean_p, freq, counts[keep]


def confusion_counts(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """k x k counts (k classes: 3, or 2 in binary mode): rows the true class, columns the predicted (argmax)."""
    k = probs.shape[1]
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    return matrix


def read_curves(metrics_csv: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(steps, values) of each `CURVES` column the CSVLogger wrote (empty cells skipped)."""
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return {}
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in CURVES}
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            for name in CURVES:
                value = row.get(name)
                if value not in (None, "") and step not in (None, ""):
                    points[name].append((float(step), float(value)))
    return {name: (np.array([s for s, _ in pts]), np.array([v for _, v in pts])) for name, pts in points.items() if pts}


# ---- plots ----------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.5):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe headless and in threads

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def tieless_rows(metrics: Mapping[str, Any]) -> tuple[int, int]:
    """(tie-less training rows, all training rows): rows of extra sources read with `ties: false` train on a
    loss over A/B alone, so the logged training loss mixes two kinds of rows (0 when there are none)."""
    sources = (metrics.get("data_counts") or {}).get("sources") or []
    tieless = sum(int(c.get("added_to_train", 0)) for c in sources if isinstance(c, Mapping) and c.get("ties") is False)
    return tieless, int(metrics.get("train_rows") or 0)


def curve_references(metrics: Mapping[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    """The horizontal lines of the curves plot: (legend label, validation log loss, line style) of the
    references and of the model the run kept (after `model.anchor_fallback`: the statistics baseline,
    not the trained model the curve ends with)."""
    lines = []
    if "prior_log_loss" in metrics:
        lines.append(("val: class prior", metrics["prior_log_loss"], {"color": "black", "linestyle": "--"}))
    if "oracle_log_loss" in metrics:
        lines.append(("val: oracle", metrics["oracle_log_loss"], {"color": "grey", "linestyle": ":"}))
    if "baseline_log_loss" in metrics:
        lines.append(("val: statistics baseline (step 0)", metrics["baseline_log_loss"],
                      {"color": "tab:purple", "linestyle": "-."}))
    fallback = metrics.get("anchor_fallback")
    if fallback and "val_log_loss" in metrics:
        lines.append((f"val: kept model = the baseline ({metrics['val_log_loss']:.4f}; trained model "
                      f"{fallback['trained_log_loss']:.4f} fell behind it)", metrics["val_log_loss"],
                      {"color": "tab:red", "linestyle": "-", "linewidth": 2}))
    elif "val_log_loss" in metrics:
        lines.append((f"val: kept model, best checkpoint ({metrics['val_log_loss']:.4f})", metrics["val_log_loss"],
                      {"color": "tab:red", "linestyle": "-", "linewidth": 1}))
    return lines


def plot_curves(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                metrics: Mapping[str, Any]) -> list[str]:
    """Draw the learning curves, the references and the kept model; returns the legend's labels."""
    fig, ax = _figure()
    tieless, rows = tieless_rows(metrics)
    for name, (steps, values) in curves.items():
        # markers on the sparse series (one point per epoch / validation would otherwise be invisible)
        style = "-" if name == "train/loss" and len(steps) > 20 else ("-s" if name == "train/log_loss" else "-o")
        label = CURVES[name]
        if tieless and name in ("train/loss", "train/log_loss"):
            label += f"; mixes {tieless} tie-less rows of {rows} (loss over A/B only)"
        ax.plot(steps, values, style, label=label, markersize=5 if style != "-" else None)
    for label, value, line in curve_references(metrics):
        ax.axhline(value, label=label, **line)
    if not curves:
        ax.text(0.5, 0.5, "no CSV metrics (the csv logger was off)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss / log loss (nats)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7)
    _save(fig, path)
    return [text.get_text() for text in legend.get_texts()]


SPARSE_BIN = 10  # reliability bins with fewer rows are drawn grey: their frequency swings from 0 to 1


def plot_reliability(path: Path, probs: np.ndarray, labels: np.ndarray, ece: float) -> dict[str, np.ndarray]:
    """Reliability per class and of the top label, 10 bins; bins with fewer than `SPARSE_BIN` rows drawn as
    grey hollow markers, each top-label bin annotated with its row count. Returns the top-label bins'
    row counts ("counts") and which are sparse ("sparse")."""
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")

    def draw(mean_p, freq, counts, marker, color, label):
        dense = counts >= SPARSE_BIN
        line = ax.plot(mean_p, freq, "-", color=color, alpha=0.5)[0]
        ax.plot(mean_p[dense], freq[dense], marker, color=line.get_color(), markersize=4, linestyle="none",
                label=label)
        ax.plot(mean_p[~dense], freq[~dense], marker, color="grey", markerfacecolor="none", markersize=4,
                linestyle="none")

    for j, name in enumerate(CLASS_LABELS[: probs.shape[1]]):
        draw(*reliability_curve(probs[:, j], labels == j), "o", None, f"P({name})")
    mean_p, freq, counts = reliability_curve(probs.max(axis=1), probs.argmax(axis=1) == labels)
    draw(mean_p, freq, counts, "s", "black", "top label (confidence); numbers: rows per bin")
    for x, y, n in zip(mean_p, freq, counts):
        ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7,
                    color="black" if n >= SPARSE_BIN else "grey")
    ax.plot([], [], "o", color="grey", markerfacecolor="none", linestyle="none",
            label=f"grey hollow: bins of < {SPARSE_BIN} rows (unreliable)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (10 bins)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability (validation, calibrated); top-label ECE = {ece:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return {"counts": counts, "sparse": counts < SPARSE_BIN}


def plot_confusion(path: Path, matrix: np.ndarray) -> None:
    fig, ax = _figure(width=5.0, height=4.5)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    high = matrix.max() / 2 if matrix.size else 0
    k = len(matrix)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > high else "black")
    ax.set_xticks(range(k), CLASS_LABELS[:k])
    ax.set_yticks(range(k), CLASS_LABELS[:k])
    ax.set_xlabel("predicted (argmax)")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (validation)")
    _save(fig, path)


def plot_probabilities(path: Path, probs: np.ndarray, labels: np.ndarray) -> None:
    fig, axes = _figure(ncols=probs.shape[1], width=4.0, height=3.5)
    bins = np.linspace(0, 1, 21)
    for j, (ax, name) in enumerate(zip(axes, CLASS_LABELS)):
        ax.hist(probs[:, j], bins=bins, alpha=0.6, label="all rows")
        ax.hist(probs[labels == j, j], bins=bins, alpha=0.6, label=f"rows where {name} is true")
        ax.axvline((labels == j).mean(), color="black", linestyle="--", label="observed rate")
        ax.set_xlabel(f"predicted P({name})")
        ax.set_title(f"P({name}), mean {probs[:, j].mean():.3f}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("rows")
    _save(fig, path)


# ---- report ---------------------------------------------------------------------------------------
def _config_yaml(cfg: DictConfig | Mapping[str, Any]) -> str:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # interpolations that only resolve inside a Hydra run (e.g. ${hydra:...})
        return OmegaConf.to_yaml(cfg, resolve=False)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """Validation log loss of the model and of its references, each with its gain over the train prior,
    over uniform and over the validation rows' own class prior."""
    refs = [metrics.get(k) for k in ("prior_log_loss", "uniform_log_loss", "val_prior_log_loss")]
    rows = [("model (best checkpoint)", metrics.get("val_log_loss", metrics.get("val_log_loss_uncalibrated")),
             metrics.get("val_accuracy"))]
    if "val_log_loss_calibrated" in metrics:
        rows.append((f"model, temperature-calibrated (T = {_fmt(metrics.get('temperature'), 3)})",
                     metrics["val_log_loss_calibrated"], metrics.get("val_accuracy")))
    rows += [("class prior of the train split", refs[0], None), ("uniform", refs[1], None),
             ("class prior of the validation rows (best constant)", refs[2], None)]
    if "oracle_log_loss" in metrics:
        rows.append(("oracle (the synthetic generator's probabilities)", metrics["oracle_log_loss"], None))
    lines = ["| predictor | val log loss | gain over train prior | gain over uniform | gain over val prior "
             "| val accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for name, loss, accuracy in rows:
        gains = [_fmt(gain_over(ref, loss) if ref is not None and loss is not None else None) for ref in refs]
        lines.append(f"| {name} | {_fmt(loss)} | {' | '.join(gains)} | {_fmt(accuracy)} |")
    return lines


def warnings_section(metrics: Mapping[str, Any]) -> list[str]:
    """A loud section at the top of the report when validation says the model is broken."""
    warnings = metrics.get("warnings") or []
    if not warnings:
        return []
    return ["## WARNING", "", *[f"- **{w}**" for w in warnings], ""]


def run_info_lines(info: Mapping[str, Any] | None) -> list[str]:
    """How the run ran (metrics.json `run_info`): precision, versions, commit, machine, the command to run next."""
    if not info:
        return []
    versions = info.get("versions") or {}
    machine = info.get("machine") or {}
    libraries = ", ".join(f"{k} {versions[k]}" for k in ("torch", "lightning", "transformers") if versions.get(k))
    gpus = ", ".join(machine.get("gpus") or []) or "none"
    lines = [f"Precision actually used: {info.get('precision')}; {libraries}; commit {info.get('git_commit') or '-'}; "
             f"machine: {machine.get('cpu', '-')} ({machine.get('cpu_cores', '-')} cores, native bf16: "
             f"{'yes' if machine.get('cpu_native_bf16') else 'no'}), GPUs: {gpus}.", ""]
    if info.get("predict_command"):
        lines += ["Predict with:", "", "```bash", info["predict_command"], "```", ""]
    return lines


def write_report(run_dir: str | Path, cfg: DictConfig | Mapping[str, Any], metrics: Mapping[str, Any],
                 val_probs: np.ndarray, val_labels: np.ndarray, metrics_csv_path: str | Path | None = None) -> Path:
    """Write `run_dir/report.md` and `run_dir/plots/*.png`; return the report's path.

    `val_probs` (n, k; k = 3, or 2 in binary mode) are the validation probabilities the run ends with (calibrated when calibration is
    on), `val_labels` (n,) their classes; `metrics_csv_path` the CSVLogger's metrics.csv (None: no curves)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    probs = np.asarray(val_probs, dtype=np.float64)
    labels = np.asarray(val_labels, dtype=np.int64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    ece = expected_calibration_error(probs, labels)
    matrix = confusion_counts(probs, labels)
    plot_curves(plots / "curves.png", read_curves(metrics_csv_path), metrics)
    plot_reliability(plots / "reliability.png", probs, labels, ece)
    plot_confusion(plots / "confusion.png", matrix)
    plot_probabilities(plots / "probabilities.png", probs, labels)

    counts = np.bincount(labels, minlength=probs.shape[1])
    class_share = ", ".join(f"{name} {c / max(1, len(labels)):.1%}" for name, c in zip(CLASS_LABELS, counts))
    mean_pred = ", ".join(f"{name} {p:.1%}" for name, p in zip(CLASS_LABELS, probs.mean(axis=0)))
    wall = metrics.get("wall_seconds")
    lines = [
        "# Training report", "",
        f"Run folder `{run_dir.resolve()}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
        *warnings_section(metrics),
        "## Data", "",
        "| split | rows |", "|---|---:|",
        f"| train | {metrics.get('train_rows', '-')} |",
        f"| validation | {metrics.get('val_rows', len(labels))} |", "",
        f"Source: {metrics.get('data', '-')}; backbone: `{metrics.get('backbone', '-')}`.",
        f"Validation classes ({len(labels)} rows scored): {class_share}; mean predicted: {mean_pred}.", "",
        "## Metrics (validation)", "",
        *metrics_table(metrics), "",
        f"Top-label expected calibration error (10 bins, probabilities below): {ece:.4f}.", "",
        "## Time", "",
        f"Training wall time: {_fmt(wall, 1)} s ({_fmt(wall / 60 if wall is not None else None, 1)} min), "
        f"{metrics.get('epochs', '-')} epoch(s); best checkpoint `{metrics.get('best_checkpoint') or '-'}`.", "",
        *run_info_lines(metrics.get("run_info")),
        "## Plots", "",
        "Learning curves (from `csv/metrics.csv`):", "", "![curves](plots/curves.png)", "",
        "Reliability diagram (per class and top label):", "", "![reliability](plots/reliability.png)", "",
        "Confusion matrix (argmax):", "", "![confusion](plots/confusion.png)", "",
        "Predicted probabilities:", "", "![probabilities](plots/probabilities.png)", "",
        "## Config", "",
        "```yaml", _config_yaml(cfg).rstrip("\n"), "```", "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def csv_metrics_path(trainer) -> Path | None:
    """The metrics.csv of the trainer's first CSVLogger (None without one)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.experiment.metrics_file_path)
    return None
