"""On-disk cache of a data file's tokenized pairs and of what its train/validation split needs.

Tokenizing the competition file (~57k rows, ~180 MB of text) is the expensive part of building the
datamodule; the tokenized pairs depend only on the file's bytes, the tokenizer and a few encoding
settings, so they are stored once and reused by later runs (and by the other DDP ranks of a node).

Two kinds of file live in the cache folder, both plain `.npz` archives read with
`np.load(..., allow_pickle=False)` and written atomically (temporary file + `os.replace`):

* `rows-<key>.npz`  (`RowTable`): per row of the file, what the prompt-grouped split and the
  reference log losses need: the normalised prompt key, the label and the oracle probabilities.
  Keyed by the file's content hash only (known before the tokenizer is), so a cached run neither
  re-parses the JSON turns of every row nor re-tokenizes.
* `pairs-<key>.npz` (`EncodedTable`): every row of the file encoded in file order: concatenated int32
  token ids + int64 offsets for side A and side B (B absent in the cross layout), the raw per-side
  statistics (float32, before normalisation, which is fitted per split), labels and row positions.
  Keyed by `pairs_key_fields`: file content hash, tokenizer files hash, the encoding spec's
  tokenization settings (`EncodingSpec.tokenization_key`), whether labels were required, the format
  version and a fingerprint of the encoding code (`PAIRS_CODE`: records.py, contract.py, pairs.py,
  text_stats.py; the row table's `ROWS_CODE` adds folds.py, whose `prompt_key` it stores), so that a change
  to how rows are parsed, split or encoded never serves stale tables.

A missing, truncated or otherwise unreadable cache file is rebuilt, never crashed on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from pref_lightning.core.atomic import atomic_path
from pref_lightning.data import contract as _contract
from pref_lightning.data import folds as _folds
from pref_lightning.data import pairs as _pairs
from pref_lightning.data import records as _records
from pref_lightning.data import text_stats as _text_stats
from pref_lightning.data.pairs import (
    CHARS_PER_TOKEN_CAP,
    SPLIT_SPECIAL_TOKENS,
    STATS_FEATURES,
    EncodedPair,
    PairEncoder,
)
from pref_lightning.data.records import PairRecord
from pref_lightning.data.stats_norm import apply_stats_norm

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the layout of the cache files changes
ENCODE_BLOCK_ROWS = 4096  # rows tokenized per block: bounds the memory of Python token lists
# tokenizer_config.json keys that say how a tokenizer was loaded, not how it tokenizes
_VOLATILE_TOKENIZER_KEYS = frozenset({"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir",
                                      "_name_or_path", "token", "revision"})


# ---- hashing ------------------------------------------------------------------------------------
_FILE_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of the file's bytes (streamed); memoised per process by path, size, mtime and inode."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if memo_key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
        _FILE_HASHES[memo_key] = digest.hexdigest()
    return _FILE_HASHES[memo_key]


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the tokenizer's saved files (`tokenizers.tokenizer_files`), loading provenance left out.

    Memoised on the tokenizer object (re-hashed if tokens were added since).
    """
    cached = getattr(tokenizer, "_pref_lightning_sha256", None)
    if cached and cached[0] == len(tokenizer):  # added tokens change the length: hash again
        return cached[1]
    from pref_lightning.data.tokenizers import tokenizer_files

    digest = hashlib.sha256()
    for name, data in sorted(tokenizer_files(tokenizer).items()):
        if name.endswith(".json") and name != "tokenizer.json":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                content = json.loads(data)
                if isinstance(content, dict):
                    content = {k: v for k, v in content.items() if k not in _VOLATILE_TOKENIZER_KEYS}
                data = json.dumps(content, sort_keys=True).encode()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    value = digest.hexdigest()
    with contextlib.suppress(AttributeError):
        tokenizer._pref_lightning_sha256 = (len(tokenizer), value)
    return value


@functools.cache
def _code_fingerprint(*code: ModuleType | Callable) -> str:
    """Hash of the source files of `code` (modules, or functions: their whole module) that decide what gets
    cached, so that a code change invalidates the cache. Given by reference, so a renamed or moved module
    is followed (or fails at import), never silently dropped from the key."""
    digest = hashlib.sha256()
    for item in code:
        module = item if isinstance(item, ModuleType) else sys.modules[item.__module__]
        try:
            digest.update(Path(module.__file__).read_bytes())
        except (OSError, TypeError):  # no source file (frozen install): fall back to the name
            digest.update(module.__name__.encode())
    return digest.hexdigest()[:16]


# what the stored tables depend on: the row table holds parsed labels, oracle and split keys (folds.prompt_key);
# the pairs table the encoded rows
ROWS_CODE: tuple[ModuleType | Callable, ...] = (_records, _text_stats, _folds.prompt_key)
PAIRS_CODE: tuple[ModuleType | Callable, ...] = (_records, _text_stats, _contract, _pairs)


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def rows_key_fields(file_hash: str, require_labels: bool) -> dict:
    return {"kind": "rows", "format": FORMAT_VERSION, "file_sha256": file_hash, "require_labels": require_labels,
            "code": _code_fingerprint(*ROWS_CODE)}


def pairs_key_fields(file_hash: str, encoder: PairEncoder, require_labels: bool) -> dict:
    """Everything the encoded pairs of a file depend on."""
    return {
        "kind": "pairs",
        "format": FORMAT_VERSION,
        "file_sha256": file_hash,
        "tokenizer_sha256": tokenizer_sha256(encoder.tokenizer),
        "encoding": encoder.spec.tokenization_key(),
        "require_labels": bool(require_labels),
        "chars_per_token_cap": CHARS_PER_TOKEN_CAP,
        "split_special_tokens": SPLIT_SPECIAL_TOKENS,  # user text spelling "</s>" is text (ids cached before: not)
        "code": _code_fingerprint(*PAIRS_CODE),
    }


# ---- tables -------------------------------------------------------------------------------------
def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    bounds = offsets.tolist()
    return [data[bounds[i]:bounds[i + 1]].decode("utf-8") for i in range(len(bounds) - 1)]


@dataclass
class RowTable:
    """Per row of a file, what the split and the reference log losses need (no texts)."""

    prompt_keys: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    oracle: np.ndarray | None  # float64 (n, 3) label probabilities, synthetic data only
    ids: list[str] | None = None  # row ids (fold files and out-of-fold predictions name rows by id)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_records(cls, records: Sequence[PairRecord], prompt_key: Callable[[PairRecord], str]) -> RowTable:
        labels = np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64)
        oracle = None
        if records and all(r.oracle is not None for r in records):
            oracle = np.array([r.oracle for r in records], dtype=np.float64).reshape(len(records), 3)
        return cls([prompt_key(r) for r in records], labels, oracle, [r.id for r in records])

    def arrays(self) -> dict[str, np.ndarray]:
        blob, offsets = _pack_strings(self.prompt_keys)
        out = {"prompt_key_bytes": blob, "prompt_key_offsets": offsets, "labels": self.labels}
        if self.oracle is not None:
            out["oracle"] = self.oracle
        if self.ids is not None:
            out["id_bytes"], out["id_offsets"] = _pack_strings(self.ids)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> RowTable:
        labels = np.asarray(arrays["labels"], dtype=np.int64)
        offsets = arrays["prompt_key_offsets"]
        blob = arrays["prompt_key_bytes"]
        if len(offsets) != len(labels) + 1 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
            raise ValueError("inconsistent prompt key offsets")
        oracle = arrays["oracle"] if "oracle" in arrays else None
        if oracle is not None and oracle.shape != (len(labels), 3):
            raise ValueError(f"oracle has shape {oracle.shape}")
        ids = None
        if "id_bytes" in arrays:
            id_offsets = arrays["id_offsets"]
            if len(id_offsets) != len(labels) + 1 or id_offsets[-1] != len(arrays["id_bytes"]):
                raise ValueError("inconsistent id offsets")
            ids = _unpack_strings(arrays["id_bytes"], id_offsets)
        return cls(_unpack_strings(blob, offsets), labels, oracle, ids)


@dataclass
class EncodedTable:
    """Every row of a file encoded, in file order, as flat arrays."""

    ids_a: np.ndarray  # int32, all A sides concatenated (cross layout: whole rows)
    offsets_a: np.ndarray  # int64 (n + 1,)
    ids_b: np.ndarray | None  # side B (cross layout: the rows with A and B exchanged); None: no side B
    offsets_b: np.ndarray | None
    stats_a: np.ndarray  # float32 (n, statistics of the spec), raw (normalisation is fitted per split)
    stats_b: np.ndarray
    labels: np.ndarray  # int64, -1 where unknown
    rows: np.ndarray  # int64 row position in the file (0..n-1: the whole file, in order)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_pairs(cls, pairs: Sequence[EncodedPair]) -> EncodedTable:
        def flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            ids = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
            return ids, offsets

        ids_a, offsets_a = flat([p.ids_a for p in pairs])
        no_side_b = bool(pairs) and pairs[0].ids_b is None
        ids_b, offsets_b = (None, None) if no_side_b else flat([p.ids_b for p in pairs])
        width = len(STATS_FEATURES)  # of an empty table only: the spec's statistics otherwise
        stats_a = np.stack([p.stats_a for p in pairs]).astype(np.float32) if pairs else np.zeros((0, width), np.float32)
        stats_b = np.stack([p.stats_b for p in pairs]).astype(np.float32) if pairs else np.zeros((0, width), np.float32)
        return cls(ids_a, offsets_a, ids_b, offsets_b, stats_a, stats_b,
                   np.array([p.label for p in pairs], dtype=np.int64), np.arange(len(pairs), dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence[EncodedTable]) -> EncodedTable:
        """Join tables of consecutive blocks of rows."""
        def join(ids: list[np.ndarray], offsets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            starts = np.cumsum([0] + [len(i) for i in ids[:-1]])
            joined = [offsets[0][:1]] + [o[1:] + s for o, s in zip(offsets, starts)]
            return np.concatenate(ids), np.concatenate(joined)

        ids_a, offsets_a = join([p.ids_a for p in parts], [p.offsets_a for p in parts])
        if parts[0].ids_b is None:
            ids_b = offsets_b = None
        else:
            ids_b, offsets_b = join([p.ids_b for p in parts], [p.offsets_b for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        return cls(ids_a, offsets_a, ids_b, offsets_b, np.concatenate([p.stats_a for p in parts]),
                   np.concatenate([p.stats_b for p in parts]), labels, np.arange(len(labels), dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"ids_a": self.ids_a, "offsets_a": self.offsets_a, "stats_a": self.stats_a, "stats_b": self.stats_b,
               "labels": self.labels, "rows": self.rows}
        if self.ids_b is not None:
            out["ids_b"], out["offsets_b"] = self.ids_b, self.offsets_b
        return out

    @classmethod
    def from_arrays(cls, arrays) -> EncodedTable:
        labels = np.asarray(arrays["labels"], dtype=np.int64)
        n = len(labels)
        ids_a, offsets_a = arrays["ids_a"], arrays["offsets_a"]
        ids_b = arrays["ids_b"] if "ids_b" in arrays else None
        offsets_b = arrays["offsets_b"] if "offsets_b" in arrays else None
        stats_a, stats_b, rows = arrays["stats_a"], arrays["stats_b"], arrays["rows"]
        for ids, offsets in ((ids_a, offsets_a), (ids_b, offsets_b)):
            if ids is None:
                continue
            if ids.dtype != np.int32 or len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(ids) \
                    or (np.diff(offsets) < 0).any():
                raise ValueError("inconsistent token ids / offsets")
        if (ids_b is None) != (offsets_b is None):
            raise ValueError("side B has ids without offsets or the reverse")
        width = stats_a.shape[1] if stats_a.ndim == 2 else -1  # the spec's statistics (part of the cache key)
        if width < 1 or stats_a.shape != (n, width) or stats_b.shape != (n, width) or stats_a.dtype != np.float32:
            raise ValueError(f"stats have shape {stats_a.shape} / {stats_b.shape}, expected ({n}, {width})")
        if not np.array_equal(rows, np.arange(n)):
            raise ValueError("row positions are not 0..n-1")
        return cls(ids_a, offsets_a, ids_b, offsets_b, stats_a, stats_b, labels, rows)

    def lengths(self) -> np.ndarray:
        lengths = np.diff(self.offsets_a)
        return lengths if self.offsets_b is None else np.maximum(lengths, np.diff(self.offsets_b))

    def select(self, rows: Sequence[int] | np.ndarray, stats_norm: dict[str, list[float]] | None) -> list[EncodedPair]:
        """`EncodedPair`s of `rows` (file positions), `index` = position within `rows`, statistics normalised
        with `stats_norm` exactly as `stats_norm.normalise_stats` does. Token ids are views of the table."""
        rows = np.asarray(rows, dtype=np.int64)
        stats_a, stats_b = self.stats_a[rows], self.stats_b[rows]
        if stats_norm is not None:
            stats_a, stats_b = apply_stats_norm(stats_a, stats_norm), apply_stats_norm(stats_b, stats_norm)
        ids_a, starts_a = self.ids_a, self.offsets_a.tolist()
        ids_b, starts_b = self.ids_b, (None if self.offsets_b is None else self.offsets_b.tolist())
        labels = self.labels[rows].tolist()
        pairs = []
        for index, row in enumerate(rows.tolist()):
            pairs.append(EncodedPair(
                ids_a=ids_a[starts_a[row]:starts_a[row + 1]],
                ids_b=None if ids_b is None else ids_b[starts_b[row]:starts_b[row + 1]],
                label=labels[index],
                index=index,
                stats_a=stats_a[index],
                stats_b=stats_b[index],
            ))
        return pairs


def encode_table(encoder: PairEncoder, records: Sequence[PairRecord], block_rows: int = ENCODE_BLOCK_ROWS) -> EncodedTable:
    """Encode `records` in file order, a block of rows at a time (one batched tokenizer call per
    `encoder.batch_size` turns), packing each block into flat arrays so that only one block's Python
    token lists are alive at once."""
    if not records:
        return EncodedTable.from_pairs([])
    parts = [EncodedTable.from_pairs(encoder.encode(records[start:start + block_rows]))
             for start in range(0, len(records), block_rows)]
    return parts[0] if len(parts) == 1 else EncodedTable.concatenate(parts)


# ---- the cache folder ---------------------------------------------------------------------------
def _meta(fields: dict) -> np.ndarray:
    return np.array(json.dumps(fields, sort_keys=True))  # a unicode scalar: loads without pickle


class PairCache:
    """A folder of `rows-*.npz` / `pairs-*.npz` files (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def rows_path(self, fields: dict) -> Path:
        return self.folder / f"rows-{_key(fields)}.npz"

    def pairs_path(self, fields: dict) -> Path:
        return self.folder / f"pairs-{_key(fields)}.npz"

    # rows
    def load_rows(self, fields: dict) -> RowTable | None:
        return self._load(self.rows_path(fields), fields, RowTable.from_arrays)

    def save_rows(self, fields: dict, table: RowTable) -> Path | None:
        return self._save(self.rows_path(fields), fields, table.arrays())

    # pairs
    def load_pairs(self, fields: dict) -> EncodedTable | None:
        return self._load(self.pairs_path(fields), fields, EncodedTable.from_arrays)

    def save_pairs(self, fields: dict, table: EncodedTable) -> Path | None:
        return self._save(self.pairs_path(fields), fields, table.arrays())

    def pairs_or_build(self, fields: dict, build: Callable[[], EncodedTable]) -> EncodedTable:
        """The cached pairs, or `build()` them and store them. Concurrent processes of one machine
        (DDP ranks) wait for the first one's build instead of repeating it."""
        table = self.load_pairs(fields)
        if table is not None:
            return table
        with self.lock(self.pairs_path(fields)):
            table = self.load_pairs(fields)  # built by another process while this one waited
            if table is None:
                table = build()
                self.save_pairs(fields, table)
        return table

    @contextlib.contextmanager
    def lock(self, target: Path) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent builders are still safe (atomic replace), only wasteful
            yield
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(target.with_suffix(".lock"), "a")  # noqa: SIM115 (held for the block)
        except OSError:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks
                pass
            yield

    def _load(self, path: Path, fields: dict, convert):
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                stored = json.loads(str(archive["meta"][()]))
                if stored != json.loads(json.dumps(fields, sort_keys=True)):
                    raise ValueError("stored key fields differ from the expected ones")
                arrays = {name: archive[name] for name in archive.files if name != "meta"}
            return convert(arrays)
        except Exception as err:  # truncated / corrupt / foreign file: rebuild it
            log.warning("cache file %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def _save(self, path: Path, fields: dict, arrays: dict[str, np.ndarray]) -> Path | None:
        """Write atomically; an unwritable cache folder is a warning, not an error."""
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, meta=_meta(fields), **arrays)
        except OSError as err:
            log.warning("cannot write the data cache %s (%s); continuing without it", path, err)
            return None
        return path


# ---- records without parsing --------------------------------------------------------------------
class LazyRecords(Sequence[PairRecord]):
    """The records at `rows` of a file, parsed only when a record is first looked at.

    `len()` needs no parsing, so a run served from the cache never parses the file's JSON turns unless
    something reads the records themselves (e.g. training an offline tokenizer on the texts).
    Indexing, slicing, iteration, `+` and `==` behave as on a list.
    """

    def __init__(self, load: Callable[[], list[PairRecord]], rows: Sequence[int] | np.ndarray) -> None:
        self._load = load
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        records = self._load()
        if isinstance(i, slice):
            return [records[j] for j in self.rows[i].tolist()]
        return records[int(self.rows[i])]

    def __iter__(self) -> Iterator[PairRecord]:
        records = self._load()
        return (records[j] for j in self.rows.tolist())

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __eq__(self, other) -> bool:
        if isinstance(other, (LazyRecords, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable-sequence semantics, like list)

    def __repr__(self) -> str:
        return f"LazyRecords({len(self)} rows)"
