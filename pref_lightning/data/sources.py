"""Extra training data mixed into the training split (`data.sources`).

`data.sources` is a list of files, each a path or `{path, format, weight, loss_weight, ties, name}` (all but
`path` optional). The main `data.train_path` is still the only file split for validation; extra rows go
into the training split only, after removing

- rows whose normalised prompt (`folds.prompt_key`) occurs anywhere in the training file (its train
  *and* validation part: an extra copy of a validation prompt would leak it into training), and
- exact duplicate rows (same prompt, answers and label, or the same pair with A and B exchanged) of a
  training-file row or of an extra row already kept.

`weight` then resamples the kept rows, seeded: 0.5 keeps a random half, 2 repeats every row twice,
1.5 keeps every row once plus a random half again. Every count is logged and returned.

`loss_weight` (default 1) multiplies the training loss of the source's rows (losses.py), without
changing how many there are. `ties` says whether the source's labels can say "tie": null (default)
detects it from the labels (a source with no tie row is tie-less), false declares it (a tie row is then
an error), true keeps the full three-class loss. A tie-less source's rows train with the conditional
likelihood of the winner given "not a tie", so they teach which answer is better and nothing about how
often answers tie.

A source with a `teacher` (a pseudo-labelled source: the 2nd / 3rd / 9th place LMSYS recipe) may be
unlabelled: each row's target is the teacher's probabilities for it, joined by id from the file
`predict.py` writes for the source's file (`python predict.py ckpt_path=... input_path=POOL
output_path=POOL_teacher.csv`), or written by `train.py` first when `teacher` names a checkpoint or a run
folder (uncalibrated predictions, `train.stages.teacher_files`); its hard label (for counts and the prior) is
the teacher's argmax.
`min_margin` keeps only rows the teacher is confident about, |P(A) - P(B)| > min_margin (WSDM 2nd place
dropped rows with |pA - pB| <= 0.03); `teacher_temperature` softens or sharpens them. Its rows can say
"tie" (the teacher says how likely one is) unless `ties: false`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pref_lightning.core.errors import UserError
from pref_lightning.data.adapters import read_source
from pref_lightning.data.records import PairRecord

log = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    path: str
    format: str | None = None
    weight: float = 1.0
    name: str | None = None
    loss_weight: float = 1.0
    ties: bool | None = None  # None: detected from the labels
    teacher: str | None = None  # pseudo-labels: the teacher's probabilities of the source's rows, by id
    min_margin: float = 0.0  # pseudo-labels: keep rows with |P(A) - P(B)| > min_margin
    teacher_temperature: float = 1.0

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def parse_sources(raw: Iterable[object] | None) -> list[SourceSpec]:
    """`data.sources` entries (plain paths or mappings) -> specs, checked."""
    specs = []
    for i, item in enumerate(raw or []):
        if isinstance(item, (str, Path)):
            spec = SourceSpec(str(item))
        elif isinstance(item, Mapping):
            unknown = set(item) - {"path", "format", "weight", "name", "loss_weight", "ties", "teacher", "min_margin",
                                   "teacher_temperature"}
            if unknown or "path" not in item:
                raise UserError(f"data.sources[{i}]={dict(item)}: needs path; may have format, weight, "
                                "loss_weight, ties, name, teacher, min_margin, teacher_temperature")
            ties = item.get("ties")
            if ties is not None and not isinstance(ties, bool):
                raise UserError(f"data.sources[{i}].ties={ties!r}; choose true, false or null (detect)")
            spec = SourceSpec(str(item["path"]), item.get("format"),
                              float(1.0 if item.get("weight") is None else item["weight"]), item.get("name"),
                              float(1.0 if item.get("loss_weight") is None else item["loss_weight"]), ties,
                              None if item.get("teacher") is None else str(item["teacher"]),
                              float(item.get("min_margin") or 0.0), float(item.get("teacher_temperature") or 1.0))
            if not 0.0 <= spec.min_margin < 1.0:
                raise UserError(f"data.sources[{i}].min_margin={spec.min_margin} must lie in [0, 1)")
            if spec.min_margin and spec.teacher is None:
                raise UserError(f"data.sources[{i}].min_margin needs a teacher (data.sources[{i}].teacher=FILE)")
        else:
            raise UserError(f"data.sources[{i}]={item!r}: give a path or {{path, format, weight}}")
        if not spec.weight >= 0:
            raise UserError(f"data.sources[{i}].weight={spec.weight} must be >= 0")
        if not spec.loss_weight >= 0:
            raise UserError(f"data.sources[{i}].loss_weight={spec.loss_weight} must be >= 0")
        specs.append(spec)
    return specs


def source_ties(spec: SourceSpec, records: Sequence[PairRecord], n_classes: int) -> bool:
    """Whether a source's labels can say "tie": `spec.ties`, else whether any row is a tie (a binary task
    has no ties). UserError when `ties: false` is declared but a row is a tie, naming the source and row."""
    tie_rows = [r.id for r in records if r.label == 2]
    if spec.ties is False and tie_rows:
        raise UserError(f"{spec.path}: data.sources entry {spec.label} has ties: false, but {len(tie_rows)} rows are "
                        f"ties (first id={tie_rows[0]}, column winner_tie)")
    if n_classes < 3:
        return False
    return bool(tie_rows) if spec.ties is None else spec.ties


def prior_of(records: Sequence[PairRecord], n_classes: int) -> list[float]:
    """Class frequencies (K,) of the records' labels (zeros when there are none)."""
    counts = [0] * n_classes
    for record in records:
        counts[record.label] += 1
    total = sum(counts)
    return [round(c / total, 6) if total else 0.0 for c in counts]


def _row_key(record: PairRecord) -> tuple:
    return (tuple(record.prompt), tuple(record.response_a), tuple(record.response_b), record.label)


def resample(records: Sequence[PairRecord], weight: float, seed: int) -> list[PairRecord]:
    """Each row `int(weight)` times, plus a seeded random `weight % 1` share of the rows once more."""
    whole, part = int(weight), weight - int(weight)
    out = [r for _ in range(whole) for r in records]
    if part > 0:
        rng = random.Random(seed)
        extra = sorted(rng.sample(range(len(records)), round(part * len(records))))
        out.extend(records[i] for i in extra)
    return out


def pseudo_label(spec: SourceSpec, records: Sequence[PairRecord], n_classes: int) -> tuple[list[PairRecord], dict, dict]:
    """A pseudo-labelled source's rows: the teacher's probabilities (by id, `teacher.read_teacher`; a row the
    teacher file lacks is an error naming it), rows with |P(A) - P(B)| <= `min_margin` dropped (none when it is 0), the label
    set to the teacher's argmax. Returns (kept records, {id(record): target (K,) float32}, counts)."""
    from pref_lightning.data.teacher import read_teacher

    soft, _ = read_teacher(spec.teacher, [r.id for r in records], n_classes, spec.teacher_temperature)
    margin = np.abs(soft[:, 0] - soft[:, 1])
    # min_margin 0 keeps every row: a row the teacher finds exactly balanced (identical answers) is a tie lesson
    keep = margin > spec.min_margin if spec.min_margin > 0 else np.ones(len(records), dtype=bool)
    kept, targets = [], {}
    for record, target, confident in zip(records, soft, keep):
        if confident:
            record.label = int(np.argmax(target))
            targets[id(record)] = target.astype(np.float32)
            kept.append(record)
    counts = {"teacher": str(spec.teacher), "min_margin": spec.min_margin,
              "teacher_temperature": spec.teacher_temperature, "removed_low_margin": len(records) - len(kept)}
    log.info("pseudo-labelled source %s: teacher %s, %d of %d rows kept (|P(A) - P(B)| > %g)", spec.label,
             spec.teacher, len(kept), len(records), spec.min_margin)
    return kept, targets, counts


def mix_sources(training_file: Sequence[PairRecord], specs: Sequence[SourceSpec], *, prompt_key, seed: int = 0,
                on_bad_rows: str = "raise", n_classes: int = 3,
                targets: list | None = None) -> tuple[list[PairRecord], list[dict]]:
    """Read, deduplicate and weight the extra sources against the whole training file.

    Returns the extra training rows and one count dictionary per source, which also holds the source's
    `ties` (declared or detected: `ties_from` config or labels), `loss_weight` and the class prior of its
    added rows; its rows are the next `added_to_train` of the returned list, in source order. `targets`, a
    list, receives one entry per returned row: the pseudo-label target (K,) of a `teacher` source's row,
    None for a labelled row.
    """
    train_prompts = {prompt_key(r) for r in training_file}
    seen_rows = {_row_key(r) for r in training_file}
    taken_ids = {r.id for r in training_file}
    extra: list[PairRecord] = []
    counts = []
    for index, spec in enumerate(specs):
        data = read_source(spec.path, spec.format, require_labels=spec.teacher is None, on_bad_rows=on_bad_rows,
                           n_classes=n_classes, seed=seed, name=spec.label)
        records, pseudo, pseudo_counts = data.records, {}, {}
        if spec.teacher is not None:
            records, pseudo, pseudo_counts = pseudo_label(spec, records, n_classes)
        ties = source_ties(spec, records, n_classes) if spec.teacher is None else (
            n_classes == 3 and spec.ties is not False)
        kept: list[PairRecord] = []
        prompt_dups = exact_dups = renamed = 0
        for record in records:
            if prompt_key(record) in train_prompts:
                prompt_dups += 1
                continue
            if _row_key(record) in seen_rows or _row_key(record.swapped()) in seen_rows:
                exact_dups += 1
                continue
            seen_rows.add(_row_key(record))
            if record.id in taken_ids:  # ids only need to be unique for bookkeeping: suffix, never drop
                record.id = f"{record.id}@{spec.label}"
                renamed += 1
            taken_ids.add(record.id)
            kept.append(record)
        weighted = resample(kept, spec.weight, seed=seed * 1_000_003 + index)
        count = {"source": spec.label, "path": str(spec.path), "format": data.format, "weight": spec.weight,
                 "rows_read": data.rows_read, "skipped_bad_rows": len(data.skipped),
                 "removed_prompt_in_train_file": prompt_dups, "removed_exact_duplicates": exact_dups,
                 "kept": len(kept), "ids_suffixed": renamed, "added_to_train": len(weighted),
                 "ties": ties, "ties_from": "labels" if spec.ties is None else "config",
                 "loss_weight": spec.loss_weight, "class_prior": prior_of(weighted, n_classes), **pseudo_counts}
        log.info("extra source %s (%s): read %d rows, skipped %d bad, removed %d whose prompt is in the training "
                 "file and %d exact duplicates, kept %d, weight %g -> %d training rows", spec.label, data.format,
                 data.rows_read, len(data.skipped), prompt_dups, exact_dups, len(kept), spec.weight,
                 len(weighted))
        if not ties and n_classes == 3:
            log.info("extra source %s has no ties: its rows train on P(winner | not a tie)", spec.label)
        counts.append(count)
        extra.extend(weighted)
        if targets is not None:
            targets.extend(pseudo.get(id(r)) for r in weighted)
    return extra, counts
