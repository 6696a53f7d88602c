"""Cheap, deterministic per-side text statistics and a small multinomial logistic regression.

The statistics are meant as side features for a model head and as a "how far does length /
formatting alone get you" baseline. Everything here is numpy (+ torch for the LBFGS fit), so it is
reproducible and needs no extra dependencies.

Label convention everywhere in this module: 0 = model_a wins, 1 = model_b wins, 2 = tie.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pref_lightning.core.losses import preference_loss
from pref_lightning.core.metrics import log_loss, softmax

__all__ = [
    "LOG1P_FEATURES",
    "NULL_TURN",
    "PAIR_FEATURES",
    "SIDE_FEATURES",
    "LogisticModel",
    "cross_validated_log_loss",
    "fit_logistic_regression",
    "pair_stats",
    "pair_stats_matrix",
    "predict_proba",
    "side_stats",
    "refusal",
    "answer_overlap",
]

# Placeholder the data parser substitutes for JSON ``null`` turns (missing answers in the arena dump).
NULL_TURN = "<null>"

SIDE_FEATURES: tuple[str, ...] = (
    "chars",  # characters over all non-null turns                      (log1p)
    "words",  # whitespace-separated tokens                             (log1p)
    "lines",  # non-blank lines                                         (log1p)
    "list_items",  # lines starting "- ", "* ", "+ ", "1. ", "2) " ...  (log1p)
    "code_blocks",  # ``` fences // 2 per turn                          (log1p)
    "headers",  # lines starting with "#" outside code blocks           (log1p)
    "turns",  # number of turns                                         (raw count)
    "empty",  # 1.0 if every turn is empty / whitespace / NULL_TURN     (flag)
    "null_turn",  # 1.0 if any turn equals NULL_TURN                    (flag)
)
# Length-like counts are heavy tailed, so they are log1p-compressed; turns and flags stay raw.
LOG1P_FEATURES: frozenset[str] = frozenset(
    {"chars", "words", "lines", "list_items", "code_blocks", "headers"}
)

# Layout of pair_stats: [stats_a | stats_b | stats_a - stats_b | prompt_chars (log1p) | prompt_turns].
PAIR_FEATURES: tuple[str, ...] = (
    tuple(f"a_{name}" for name in SIDE_FEATURES)
    + tuple(f"b_{name}" for name in SIDE_FEATURES)
    + tuple(f"diff_{name}" for name in SIDE_FEATURES)
    + ("prompt_chars", "prompt_turns")
)

_LIST_ITEM = re.compile(r"^(?:[-*+\u2022]\s|\d{1,3}[.)]\s)")
_LOG1P_MASK = np.array([name in LOG1P_FEATURES for name in SIDE_FEATURES])


def _turn_counts(turn: str) -> tuple[int, int, int, int, int, int]:
    """chars, words, non-blank lines, list items, code blocks, headers of one turn."""
    lines = list_items = headers = 0
    in_code = False
    for raw in turn.splitlines():
        line = raw.strip()
        if not line:
            continue
        lines += 1
        if line.startswith("```"):
            in_code = not in_code
            continue
        # Markdown markers inside code are comments / operators, not structure.
        if in_code:
            continue
        if line.startswith("#"):
            headers += 1
        elif _LIST_ITEM.match(line):
            list_items += 1
    return len(turn), len(turn.split()), lines, list_items, turn.count("```") // 2, headers


def side_stats(turns: Sequence[str]) -> np.ndarray:
    """Statistics of one side (all turns of one answer, or of the prompt), ordered as SIDE_FEATURES.

    Turns equal to NULL_TURN contribute nothing to the counts; they only set the ``null_turn`` flag
    (and count towards ``turns``). ``None`` turns are treated like NULL_TURN for robustness.
    """
    totals = [0, 0, 0, 0, 0, 0]
    has_null = False
    all_empty = True
    for turn in turns:
        if turn is None or turn == NULL_TURN:
            has_null = True
            continue
        if turn.strip():
            all_empty = False
        for i, value in enumerate(_turn_counts(turn)):
            totals[i] += value
    out = np.array(
        [*totals, len(turns), float(all_empty), float(has_null)],
        dtype=np.float64,
    )
    out[_LOG1P_MASK] = np.log1p(out[_LOG1P_MASK])
    return out.astype(np.float32)


# An answer that declines ("I'm sorry, but I can't ...") loses most arena votes and two of them often tie;
# English phrasings as in the LMSYS competition's public feature sets, looked for near the answer's start.
_REFUSAL = re.compile(
    r"\b(?:I'?m sorry|I am sorry|I apologi[sz]e|I cannot|I can'?t|I can ?not|I'?m (?:not able|unable)|"
    r"I am (?:not able|unable)|I (?:won'?t|will not) be able|as an AI|as a language model|"
    r"I'?m an AI|I do not have the ability|I don'?t have the ability)\b", re.IGNORECASE)
_WORD = re.compile(r"\w+")
REFUSAL_CHARS = 300  # where a refusal is looked for in each turn (they come first)
OVERLAP_CHARS = 20_000  # words of each answer compared, from its start (speed only)


def refusal(turns: Sequence[str]) -> float:
    """1.0 if a turn of the answer starts (first REFUSAL_CHARS characters) like a refusal, else 0.0."""
    return float(any(t and t != NULL_TURN and _REFUSAL.search(t[:REFUSAL_CHARS]) for t in turns))


def answer_overlap(response_a: Sequence[str], response_b: Sequence[str]) -> tuple[float, float]:
    """(Jaccard overlap of the two answers' lower-cased word sets in [0, 1], 1.0 if the answers are the same
    text up to whitespace and case else 0.0): alike answers are likely ties."""
    def text(turns):
        return " ".join(t for t in turns if t and t != NULL_TURN)

    a, b = text(response_a), text(response_b)
    identical = float(" ".join(a.lower().split()) == " ".join(b.lower().split()))
    words_a, words_b = set(_WORD.findall(a[:OVERLAP_CHARS].lower())), set(_WORD.findall(b[:OVERLAP_CHARS].lower()))
    union = words_a | words_b
    return (len(words_a & words_b) / len(union) if union else 1.0), identical


def pair_stats(prompt: Sequence[str], response_a: Sequence[str], response_b: Sequence[str]) -> np.ndarray:
    """Features of one comparison, laid out as PAIR_FEATURES (float32, len 3 * len(SIDE_FEATURES) + 2)."""
    a = side_stats(response_a)
    b = side_stats(response_b)
    prompt_chars = sum(len(t) for t in prompt if t is not None and t != NULL_TURN)
    extra = np.array([math.log1p(prompt_chars), len(prompt)], dtype=np.float32)
    return np.concatenate([a, b, a - b, extra]).astype(np.float32)


def pair_stats_matrix(
    rows: Iterable[tuple[Sequence[str], Sequence[str], Sequence[str]]],
) -> np.ndarray:
    """Stack pair_stats for an iterable of (prompt, response_a, response_b) turn lists -> (n, n_features)."""
    feats = [pair_stats(p, a, b) for p, a, b in rows]
    if not feats:
        return np.zeros((0, len(PAIR_FEATURES)), dtype=np.float32)
    return np.stack(feats)


@dataclass(frozen=True)
class LogisticModel:
    """Standardise-then-linear multinomial model: softmax(((X - mean) / std) @ weights + bias)."""

    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)
    weights: np.ndarray  # (d, k)
    bias: np.ndarray  # (k,)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return predict_proba(self, X)


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    # Constant columns (e.g. "turns" on single-turn data) would divide by zero; leave them centred at 0.
    std = np.where(std < 1e-8, 1.0, std)
    return mean, std


def fit_logistic_regression(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int = 3,
    l2: float = 1e-3,
    max_iter: int = 200,
    tol: float = 1e-9,
    ties: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> LogisticModel:
    """Multinomial logistic regression on standardised X, fitted full-batch with LBFGS in float64.

    Objective: mean cross-entropy + l2 * ||weights||^2 (bias unpenalised); with `ties` (n,) bool and
    `weight` (n,) the training loss of `losses.preference_loss` instead (tie-less rows conditional on
    "not a tie", rows weighted). Starts from zeros with a
    deterministic single-threaded optimiser, so the same inputs give the same model.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"expected X (n, d) and y (n,), got {X.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    mean, std = _standardise(X)
    xs = torch.from_numpy((X - mean) / std)
    yt = torch.from_numpy(y)
    ties_t = None if ties is None else torch.from_numpy(np.asarray(ties, dtype=bool))
    weight_t = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float64))
    w = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xs @ w + b
        fit = torch.nn.functional.cross_entropy(logits, yt) if ties is None and weight is None \
            else preference_loss(logits, yt, ties_t, weight_t)
        loss = fit + l2 * (w * w).sum()
        loss.backward()
        return loss

    # Single-threaded: a problem this small gains nothing from threads, and intra-op threads fighting
    # with other libraries' pools (e.g. pyarrow after a big read_csv) made fits ~30x slower on 2 cores.
    # It also pins the reduction order, so results are bit-for-bit reproducible.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(n_threads)
    return LogisticModel(
        mean=mean, std=std, weights=w.detach().numpy().copy(), bias=b.detach().numpy().copy()
    )


def predict_proba(model: LogisticModel, X: np.ndarray) -> np.ndarray:
    """Class probabilities (n, k) in float64."""
    return softmax(((np.asarray(X, dtype=np.float64) - model.mean) / model.std) @ model.weights + model.bias)


def cross_validated_log_loss(
    X: np.ndarray,
    y: np.ndarray,
    n_folds: int = 5,
    seed: int = 0,
    n_classes: int = 3,
    l2: float = 1e-3,
) -> float:
    """Out-of-fold log loss of fit_logistic_regression over a seeded random n_folds split."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = y.size
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"need 2 <= n_folds <= n_rows, got n_folds={n_folds}, n_rows={n}")
    order = np.random.default_rng(seed).permutation(n)
    oof = np.zeros((n, n_classes), dtype=np.float64)
    for fold in np.array_split(order, n_folds):
        train = np.ones(n, dtype=bool)
        train[fold] = False
        model = fit_logistic_regression(X[train], y[train], n_classes=n_classes, l2=l2)
        oof[fold] = predict_proba(model, X[fold])
    return log_loss(oof, y)
