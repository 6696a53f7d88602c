"""CSV / parquet -> validated `PairRecord`s (the first stage of the data flow).

The Kaggle files store each of `prompt`, `response_a`, `response_b` as a JSON list of turns. Real rows
contain `null` turns, lone UTF-16 surrogates (they crash tokenizers when encoded) and occasionally a
plain string that is not JSON at all. This module turns all of that into clean `list[str]` turns and
refuses bad labels or columns with an error that names the file, the row id and the column.
"""

from __future__ import annotations

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
from pref_lightning.data.text_stats import NULL_TURN

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
ORACLE_COLUMNS = ("p_model_a", "p_model_b", "p_tie")  # written by the synthetic generator only
# probabilities in every CSV written (submission, oof): 8 significant digits, whatever the float width
FLOAT_FORMAT = "%.8g"
EMPTY_TURN = ""


class DataError(UserError):
    """Bad input data; the message names the file, the row id and the column."""


class BadRowError(DataError):
    """One bad row (a cell that cannot be read): `data.on_bad_rows=skip` may drop it instead of failing."""

    def __init__(self, path: str | Path, row_id: str, column: str, reason: str) -> None:
        super().__init__(f"{path}: row id={row_id}: column {column} {reason}")
        self.path, self.row_id, self.column, self.reason = str(path), row_id, column, reason

    def as_dict(self) -> dict[str, str]:
        return {"file": self.path, "id": self.row_id, "column": self.column, "reason": self.reason}


ON_BAD_ROWS = ("raise", "skip")


def check_on_bad_rows(value: str) -> str:
    if value not in ON_BAD_ROWS:
        raise UserError(f"data.on_bad_rows={value!r}; choose from {', '.join(ON_BAD_ROWS)}")
    return value


@dataclass
class PairRecord:
    """One comparison: a conversation prompt and two candidate answers, each a list of turns."""

    id: str
    prompt: list[str]
    response_a: list[str]
    response_b: list[str]
    label: int | None = None  # 0 = A wins, 1 = B wins, 2 = tie; None for test rows
    oracle: tuple[float, float, float] | None = None  # true label probabilities (synthetic data)
    extra: dict[str, str] = field(default_factory=dict)

    def swapped(self) -> PairRecord:
        """The same comparison with A and B exchanged (labels exchanged too)."""
        label = None if self.label is None else (1, 0, 2)[self.label]
        oracle = None if self.oracle is None else (self.oracle[1], self.oracle[0], self.oracle[2])
        return PairRecord(self.id, self.prompt, self.response_b, self.response_a, label, oracle, self.extra)


def repair_text(text: str) -> str:
    """Join valid surrogate pairs and replace lone surrogates with U+FFFD.

    `json.loads` of Kaggle's ensure_ascii text yields lone surrogates (e.g. half an emoji), which
    cannot be encoded as UTF-8 and make fast tokenizers raise.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _turn_to_text(turn: object) -> str:
    if turn is None:
        return NULL_TURN
    if isinstance(turn, str):
        return repair_text(turn)
    if isinstance(turn, float) and math.isnan(turn):
        return NULL_TURN
    if isinstance(turn, (int, float, bool)):
        return str(turn)
    # nested lists / dicts: keep their content visible rather than dropping the turn
    return repair_text(json.dumps(turn, ensure_ascii=False))


def parse_turns(cell: object) -> list[str]:
    """Parse one text cell into a non-empty list of turns.

    JSON lists give one turn per element (`null` -> a visible placeholder); a JSON string, a
    number or non-JSON text is a single turn; an empty cell or empty list is one empty turn.
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return [NULL_TURN]
    if isinstance(cell, (list, tuple, np.ndarray)):  # parquet files may hold real lists
        value: object = list(cell)
    else:
        text = str(cell)
        stripped = text.strip()
        if not stripped:
            return [EMPTY_TURN]
        if stripped[0] in '["{' or stripped in ("null", "true", "false") or _looks_numeric(stripped):
            try:
                value = json.loads(stripped)
            except (json.JSONDecodeError, RecursionError):
                value = text
        else:
            value = text
    if isinstance(value, list):
        turns = [_turn_to_text(t) for t in value]
        return turns if turns else [EMPTY_TURN]
    return [_turn_to_text(value)]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet file with every cell kept as text (ids stay exactly as written).

    Bytes that are not UTF-8 (say, an encoded lone surrogate) become U+FFFD rather than failing the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding_errors="replace")
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot parse as {'parquet' if suffix in ('.parquet', '.pq') else 'CSV'}: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame) == 0:
        raise DataError(f"{path}: file has a header but no rows")
    return frame


def _parse_label(path: Path, row_id: str, row: dict) -> int:
    values = []
    for column in CLASS_COLUMNS:
        raw = row[column]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise BadRowError(path, row_id, column, f"has {raw!r}, expected 0 or 1") from None
        if value not in (0.0, 1.0):
            raise BadRowError(path, row_id, column, f"has {raw!r}, expected 0 or 1")
        values.append(int(value))
    if sum(values) != 1:
        shown = ", ".join(f"{c}={v}" for c, v in zip(CLASS_COLUMNS, values))
        raise BadRowError(path, row_id, ", ".join(CLASS_COLUMNS), f"must have exactly one 1, got {shown}")
    return values.index(1)


def require_columns(frame: pd.DataFrame, needed: Sequence[str], path: str | Path) -> None:
    """Raise a DataError naming the file, the missing columns and the columns it has."""
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")


def records_from_frame(frame: pd.DataFrame, path: str | Path, require_labels: bool, on_bad_rows: str = "raise",
                       skipped: list[dict[str, str]] | None = None) -> list[PairRecord]:
    """Validate a raw table and convert it to records, in file order.

    No row is ever dropped unless `on_bad_rows="skip"` (training only): then a row whose label or
    oracle cells cannot be read is left out and described in `skipped` (file, id, column, reason).
    """
    path = Path(path)
    check_on_bad_rows(on_bad_rows)
    require_columns(frame, ["id", *TEXT_COLUMNS] + (list(CLASS_COLUMNS) if require_labels else []), path)
    ids = frame["id"].map(lambda v: str(v).strip())
    blank = ids[ids == ""]
    if len(blank):
        raise DataError(f"{path}: column id is empty on data line(s) {', '.join(str(i + 2) for i in blank.index[:5])}")
    duplicated = ids[ids.duplicated(keep=False)]
    if len(duplicated):
        shown = ", ".join(sorted(set(duplicated.tolist()))[:5])
        raise DataError(f"{path}: column id has duplicate value(s): {shown}")
    has_labels = all(c in frame.columns for c in CLASS_COLUMNS)
    has_oracle = all(c in frame.columns for c in ORACLE_COLUMNS)
    columns = {c: frame[c].tolist() for c in frame.columns}
    records = []
    for i, row_id in enumerate(ids.tolist()):
        row = {c: values[i] for c, values in columns.items()}
        label = None
        if require_labels:
            try:
                label = _parse_label(path, row_id, row)
            except BadRowError as err:
                if on_bad_rows == "raise":
                    raise
                if skipped is not None:
                    skipped.append(err.as_dict())
                continue
        elif has_labels:  # prediction input: labels are optional extras, never a reason to fail
            try:
                label = _parse_label(path, row_id, row)
            except DataError:
                label = None
        oracle = None
        if has_oracle:
            try:
                oracle = tuple(float(row[c]) for c in ORACLE_COLUMNS)
            except (TypeError, ValueError):
                err = BadRowError(path, row_id, ", ".join(ORACLE_COLUMNS), "must be numbers")
                if not require_labels:  # prediction: the oracle is an optional extra, never a reason to fail
                    oracle = None
                elif on_bad_rows == "raise":
                    raise err from None
                else:
                    if skipped is not None:
                        skipped.append(err.as_dict())
                    continue
        extra = {c: str(row[c]) for c in ("model_a", "model_b") if c in row}
        turns = [parse_turns(row[c]) for c in TEXT_COLUMNS]
        records.append(PairRecord(row_id, *turns, label=label, oracle=oracle, extra=extra))
    return records


def read_records(path: str | Path, require_labels: bool = True) -> list[PairRecord]:
    """Read a Kaggle-format CSV/parquet file into records.

    `require_labels=True` (training) demands valid winner columns; `False` (prediction) accepts
    files without them and never drops a row.
    """
    records = records_from_frame(read_table(path), path, require_labels)
    notice_empty_prompts(records, path)
    return records


def has_empty_prompt(record: PairRecord) -> bool:
    """No prompt text at all: every turn empty, blank or a null cell."""
    return all(not turn.strip() or turn == NULL_TURN for turn in record.prompt)


def notice_empty_prompts(records: Sequence[PairRecord], path: str | Path) -> int:
    """One notice line (the log, hence the terminal and the run's log file) when rows of `path` have an
    empty prompt: they are kept and encoded with an empty prompt, so the answers alone decide. Returns the count."""
    empty = [r.id for r in records if has_empty_prompt(r)]
    if empty:
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        log.warning("notice: %s: %d of %d rows have an empty prompt (id %s); they are kept, encoded with an "
                    "empty prompt, so their answers alone decide", path, len(empty), len(records), shown)
    return len(empty)


def label_array(records: Sequence[PairRecord]) -> np.ndarray:
    return np.array([r.label for r in records], dtype=np.int64)
