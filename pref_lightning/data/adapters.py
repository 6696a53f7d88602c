"""External data sets -> `PairRecord`s in one schema.

Every adapter returns records whose turns are clean `list[str]` and whose `extra` carries `source`
(the file's name), `format`, and where the file has them `model_a`, `model_b`, `language`.
Formats (`format:` key, or detected from the columns when left out):

- `kaggle`: the LMSYS competition's csv/parquet (`prompt`, `response_a`, `response_b` as JSON lists of
  turns, one-hot `winner_model_a/_b/_tie`); exactly `records.read_records`.
- `arena_conversations`: `lmsys/chatbot_arena_conversations` (JSON lines, JSON or parquet):
  `question_id` (the row id), `model_a`, `model_b`, `winner` in {model_a, model_b, tie, tie (bothbad)}
  (both ties are a tie), `conversation_a` / `conversation_b` as lists of {role, content}: the user turns
  of `conversation_a` are the prompt, the assistant turns of each side its answer.
- `wsdm`: WSDM Cup parquet (`id`, `prompt`, `response_a`, `response_b` as plain strings, never parsed as
  JSON; `winner` in {model_a, model_b}; the test file has `scored` and no `winner`).
- `chosen_rejected`: generic pairs (`prompt`, `chosen`, `rejected`, optional `id`; cells are JSON lists
  of turns or plain text). Which side becomes A is a coin seeded by (seed, id): reproducible and
  independent of row order. Without an `id` column the id is a hash of the row's text.

Ids: a file's ids must be unique (a duplicate is a `DataError`, as for Kaggle files). Across the files of
a mix (`pref_lightning.data.sources`) an extra row whose id is already taken gets the suffix `@<source>`.

Training (`require_labels=True`) refuses a row whose label cannot be read with a `BadRowError` naming
file, id and column, or with `on_bad_rows="skip"` leaves it out (each one logged at WARNING, then a
count). With `n_classes=2` (binary task) a tie is such a bad row. Prediction never drops a row: bad or
missing labels become None and unreadable text becomes a visible turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pref_lightning.core.errors import UserError
from pref_lightning.core.metrics import CLASS_COLUMNS
from pref_lightning.data.records import (
    EMPTY_TURN,
    BadRowError,
    DataError,
    PairRecord,
    _turn_to_text,
    check_on_bad_rows,
    notice_empty_prompts,
    parse_turns,
    read_table,
    records_from_frame,
    repair_text,
    require_columns,
)
from pref_lightning.data.text_stats import NULL_TURN

log = logging.getLogger(__name__)

FORMATS = ("kaggle", "arena_conversations", "wsdm", "chosen_rejected")
WINNERS = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 2}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class SourceData:
    """What one file gave: its records (file order) and the rows left out (`on_bad_rows=skip`)."""

    path: Path
    format: str
    records: list[PairRecord]
    rows_read: int
    skipped: list[dict[str, str]] = field(default_factory=list)


# ---- reading ------------------------------------------------------------------------------------
def read_frame(path: str | Path) -> pd.DataFrame:
    """csv / parquet (every csv cell as text) or JSON lines / a JSON array of objects."""
    path = Path(path)
    if path.suffix.lower() not in JSON_SUFFIXES:
        return read_table(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    rows: list[object]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: cannot parse as JSON: {err}") from err
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not JSON: {err}") from err
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
    if bad:
        raise DataError(f"{path}: record {bad[0] + 1} is not a JSON object")
    if not rows:
        raise DataError(f"{path}: file has no rows")
    frame = pd.DataFrame(rows, dtype=object)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def detect_format(frame: pd.DataFrame, path: str | Path = "") -> str:
    """The adapter for a table, from its columns (Kaggle when nothing else matches)."""
    cols = set(frame.columns)
    if {"conversation_a", "conversation_b"} <= cols:
        return "arena_conversations"
    if {"chosen", "rejected"} <= cols:
        return "chosen_rejected"
    if cols & set(CLASS_COLUMNS):
        return "kaggle"
    if {"prompt", "response_a", "response_b"} <= cols:
        # WSDM files have `winner` (train) or `scored` (test); anything else is read as Kaggle (whose reader
        # also takes plain text cells): set format: wsdm to keep JSON-looking WSDM text literal
        return "wsdm" if "winner" in cols or "scored" in cols else "kaggle"
    # nothing matches: the Kaggle reader names the missing columns (the competition format is the default)
    return "kaggle"


def sniff_format(path: str | Path) -> str:
    """The detected format from the file's header alone (JSON files: never Kaggle); "kaggle" when the
    header cannot be read, so that the reader itself reports what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            columns = pd.read_csv(path, nrows=0, encoding_errors="replace").columns
        return detect_format(pd.DataFrame(columns=[str(c).strip() for c in columns]), path)
    except Exception:  # noqa: BLE001 (any unreadable header: let the full reader raise its DataError)
        return "kaggle"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text_turn(value: object) -> list[str]:
    """A plain-text cell (WSDM): one turn, never parsed as JSON."""
    if _missing(value):
        return [NULL_TURN]
    if isinstance(value, str):
        return [repair_text(value)]
    if isinstance(value, (list, tuple, np.ndarray)):
        return parse_turns(value)
    return [_turn_to_text(value)]


def _ids(frame: pd.DataFrame, column: str | None, path: Path, fallback) -> list[str]:
    if column is None or column not in frame.columns:
        ids = [fallback(i) for i in range(len(frame))]
    else:
        ids = [("" if _missing(v) else str(v)).strip() for v in frame[column].tolist()]
        blank = [i for i, v in enumerate(ids) if not v]
        if blank:
            raise DataError(f"{path}: column {column} is empty in row(s) {', '.join(str(i + 1) for i in blank[:5])}")
    seen: set[str] = set()
    dups = sorted({v for v in ids if v in seen or seen.add(v)})
    if dups:
        raise DataError(f"{path}: column {column or 'id'} has duplicate value(s): {', '.join(dups[:5])}")
    return ids


def _winner(path: Path, row_id: str, value: object, allowed: dict[str, int], column: str = "winner") -> int:
    text = "" if _missing(value) else str(value).strip().lower()
    if text not in allowed:
        raise BadRowError(path, row_id, column, f"has {value!r}, expected one of {', '.join(allowed)}")
    return allowed[text]


def _extra(row: dict, source: str, fmt: str, keys: Sequence[str] = ("model_a", "model_b", "language")) -> dict:
    extra = {"source": source, "format": fmt}
    for key in keys:
        if key in row and not _missing(row[key]):
            extra[key] = str(row[key])
    return extra


# ---- adapters -----------------------------------------------------------------------------------
def _rows(frame: pd.DataFrame) -> list[dict]:
    columns = {c: frame[c].tolist() for c in frame.columns}
    return [{c: values[i] for c, values in columns.items()} for i in range(len(frame))]


def _winner_label(path: Path, row_id: str, row: dict, require_labels: bool) -> int | None:
    """The class of the row's `winner` cell; in prediction a missing or unreadable one is None, never an error."""
    if require_labels:
        return _winner(path, row_id, row["winner"], WINNERS)
    try:
        return _winner(path, row_id, row["winner"], WINNERS)
    except (BadRowError, KeyError):
        return None


def _conversation(path: Path, row_id: str, value: object, column: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise BadRowError(path, row_id, column, "is not a JSON list of {role, content} messages") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, dict) for m in value):
        raise BadRowError(path, row_id, column, "is not a list of {role, content} messages")
    return list(value)


def _role_turns(messages: list[dict], roles: tuple[str, ...]) -> list[str]:
    turns = [_turn_to_text(m.get("content")) for m in messages if str(m.get("role", "")).lower() in roles]
    return turns or [EMPTY_TURN]


def arena_conversations(frame: pd.DataFrame, path: Path, require_labels: bool, on_bad_rows: str,
                        skipped: list[dict], source: str) -> list[PairRecord]:
    needed = ["question_id", "conversation_a", "conversation_b"] + (["winner"] if require_labels else [])
    require_columns(frame, needed, path)
    ids = _ids(frame, "question_id", path, str)
    records = []
    for row_id, row in zip(ids, _rows(frame)):
        try:
            label = _winner_label(path, row_id, row, require_labels)
            try:
                conv_a = _conversation(path, row_id, row["conversation_a"], "conversation_a")
                conv_b = _conversation(path, row_id, row["conversation_b"], "conversation_b")
                prompt = _role_turns(conv_a, ("user", "human"))
                answer_a = _role_turns(conv_a, ("assistant", "gpt", "bot"))
                answer_b = _role_turns(conv_b, ("assistant", "gpt", "bot"))
            except BadRowError:
                if require_labels:
                    raise
                # prediction keeps the row: its raw cells become visible text
                prompt = [EMPTY_TURN]
                answer_a, answer_b = parse_turns(row["conversation_a"]), parse_turns(row["conversation_b"])
        except BadRowError as err:
            _skip_or_raise(err, on_bad_rows, skipped)
            continue
        extra = _extra(row, source, "arena_conversations", ("model_a", "model_b", "language", "turn"))
        records.append(PairRecord(row_id, prompt, answer_a, answer_b, label=label, extra=extra))
    return records


def wsdm(frame: pd.DataFrame, path: Path, require_labels: bool, on_bad_rows: str, skipped: list[dict],
         source: str) -> list[PairRecord]:
    needed = ["id", "prompt", "response_a", "response_b"] + (["winner"] if require_labels else [])
    require_columns(frame, needed, path)
    ids = _ids(frame, "id", path, str)
    records = []
    for row_id, row in zip(ids, _rows(frame)):
        try:
            label = _winner_label(path, row_id, row, require_labels)
        except BadRowError as err:
            _skip_or_raise(err, on_bad_rows, skipped)
            continue
        extra = _extra(row, source, "wsdm", ("model_a", "model_b", "language", "scored"))
        records.append(PairRecord(row_id, _text_turn(row["prompt"]), _text_turn(row["response_a"]),
                                  _text_turn(row["response_b"]), label=label, extra=extra))
    return records


def coin(seed: int, row_id: str) -> bool:
    """True: the chosen answer becomes A. Seeded by (seed, id): reproducible, independent of row order."""
    return hashlib.sha256(f"{seed}\0{row_id}".encode("utf-8", "surrogatepass")).digest()[0] & 1 == 0


def _content_id(row: dict) -> str:
    text = "\0".join(str(row.get(c)) for c in ("prompt", "chosen", "rejected"))
    return "cr-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def chosen_rejected(frame: pd.DataFrame, path: Path, require_labels: bool, on_bad_rows: str,
                    skipped: list[dict], source: str, seed: int = 0) -> list[PairRecord]:
    require_columns(frame, ["prompt", "chosen", "rejected"], path)
    rows = _rows(frame)
    ids = _ids(frame, "id" if "id" in frame.columns else None, path, lambda i: _content_id(rows[i]))
    records = []
    for row_id, row in zip(ids, rows):
        chosen, rejected = parse_turns(row["chosen"]), parse_turns(row["rejected"])
        chosen_is_a = coin(seed, row_id)
        a, b = (chosen, rejected) if chosen_is_a else (rejected, chosen)
        extra = _extra(row, source, "chosen_rejected")
        records.append(PairRecord(row_id, parse_turns(row["prompt"]), a, b, label=0 if chosen_is_a else 1,
                                  extra=extra))
    return records


def kaggle(frame: pd.DataFrame, path: Path, require_labels: bool, on_bad_rows: str, skipped: list[dict],
           source: str) -> list[PairRecord]:
    records = records_from_frame(frame, path, require_labels, on_bad_rows=on_bad_rows, skipped=skipped)
    language = frame["language"].tolist() if "language" in frame.columns else None
    positions = {str(v).strip(): i for i, v in enumerate(frame["id"].tolist())} if language else {}
    for record in records:
        record.extra = {"source": source, "format": "kaggle", **record.extra}
        if language is not None and not _missing(language[positions[record.id]]):
            record.extra["language"] = str(language[positions[record.id]])
    return records


def _skip_or_raise(err: BadRowError, on_bad_rows: str, skipped: list[dict]) -> None:
    if on_bad_rows == "raise":
        raise err
    skipped.append(err.as_dict())


def _restrict_classes(records: list[PairRecord], n_classes: int, path: Path, fmt: str, on_bad_rows: str,
                      skipped: list[dict], require_labels: bool) -> list[PairRecord]:
    """Binary tasks: a tie is a bad training row (prediction keeps the row and forgets the label)."""
    if n_classes == 3:
        return records
    if n_classes != 2:
        raise UserError(f"data.n_classes={n_classes}; choose 2 (A/B) or 3 (A/B/tie)")
    column = "winner_tie" if fmt == "kaggle" else "winner"
    kept = []
    for record in records:
        if record.label is not None and record.label >= n_classes:
            if not require_labels:
                record.label = None
            else:
                _skip_or_raise(BadRowError(path, record.id, column, "is a tie, but the task is binary (n_classes=2)"),
                               on_bad_rows, skipped)
                continue
        kept.append(record)
    return kept


def read_source(path: str | Path, format: str | None = None, *, require_labels: bool = True,
                on_bad_rows: str = "raise", n_classes: int = 3, seed: int = 0,
                name: str | None = None) -> SourceData:
    """Read one file with its adapter (`format` None: detected) into records in file order."""
    path = Path(path)
    check_on_bad_rows(on_bad_rows)
    frame = read_frame(path)
    fmt = format or detect_format(frame, path)
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} for {path}; choose from {', '.join(FORMATS)}")
    source = name or path.stem
    skipped: list[dict[str, str]] = []
    if fmt == "chosen_rejected":
        records = chosen_rejected(frame, path, require_labels, on_bad_rows, skipped, source, seed=seed)
    else:
        adapter = {"kaggle": kaggle, "arena_conversations": arena_conversations, "wsdm": wsdm}[fmt]
        records = adapter(frame, path, require_labels, on_bad_rows, skipped, source)
    records = _restrict_classes(records, n_classes, path, fmt, on_bad_rows, skipped, require_labels)
    for item in skipped:
        log.warning("skipped bad row: file=%s id=%s column=%s: %s", item["file"], item["id"], item["column"],
                    item["reason"])
    if skipped:
        log.warning("%s: skipped %d of %d rows (data.on_bad_rows=skip)", path, len(skipped), len(frame))
    notice_empty_prompts(records, path)
    return SourceData(path, fmt, records, len(frame), skipped)


def read_any(path: str | Path, format: str | None = None, require_labels: bool = False) -> list[PairRecord]:
    """Prediction input of any format: every row, in file order."""
    return read_source(path, format, require_labels=require_labels).records
