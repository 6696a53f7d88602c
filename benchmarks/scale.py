"""Scale check: build the datamodule on a competition-sized file, cold and from the data cache.

Writes a synthetic arena-format file of 57,477 rows (the size of Kaggle's train.csv, real-like
lengths), trains the tiny offline tokenizer on a sample of its texts (before anything is timed), then
builds `PreferenceDataModule` (read + prompt-grouped split + tokenize + normalise, max_length 1024,
siamese layout) in fresh subprocesses:

  nocache  cache_dir=None: the in-memory path (what every run did before the cache existed)
  cold     an empty cache folder: parse, tokenize, write the cache
  cached   the same folder again: load the cache

For each it records the subprocess wall time (interpreter start, imports and tokenizer load included),
the datamodule build time alone (load_records + attach_tokenizer + setup("fit")), its phases, CPU time
and peak RSS (`ru_maxrss`), and checks that the three runs give identical pairs. Prints a table and
writes benchmarks/results/scale.json. Not a test: timings depend on the machine and its load.

    python benchmarks/scale.py                  # 57,477 rows
    python benchmarks/scale.py --rows 5000      # quick run
    python benchmarks/scale.py --prepare-only   # data + tokenizer only (then time under a lock)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
TARGETS = {"cold_s": 90.0, "cached_s": 5.0, "peak_rss_mb": 3072.0}  # 3 GB read as 3 GiB
BUSY_PATTERN = "train.py|learning.py|throughput.py"


# ---- child: one datamodule build in a fresh process ----------------------------------------------
def child(spec: dict) -> dict:
    started = time.perf_counter()
    import hashlib

    import numpy as np
    from transformers import AutoTokenizer

    from pref_lightning.data import datamodule as datamodule_module
    from pref_lightning.data.datamodule import PreferenceDataModule
    from pref_lightning.data.pairs import PairEncoder

    # where the time goes: wrap the stages (their own cost is negligible)
    phases = {"hash_s": 0.0, "parse_s": 0.0, "tokenize_s": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            begun = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - begun
        return wrapper

    datamodule_module.file_sha256 = timed("hash_s", datamodule_module.file_sha256)
    datamodule_module.read_records = timed("parse_s", datamodule_module.read_records)
    PairEncoder.tokenize_turns = timed("tokenize_s", PairEncoder.tokenize_turns)
    imported = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    loaded = time.perf_counter()
    dm = PreferenceDataModule(train_path=spec["csv"], val_fraction=0.05, max_length=spec["max_length"],
                              layout=spec["layout"], batch_size=8, cache_dir=spec["cache_dir"])
    dm.load_records()
    records_done = time.perf_counter()
    dm.attach_tokenizer(tokenizer)
    dm.setup("fit")
    built = time.perf_counter()
    ready_epoch = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
    cpu_s = usage.ru_utime + usage.ru_stime

    batch = next(iter(dm.train_dataloader()))  # the sets are usable
    digest = hashlib.sha256()
    tokens = 0
    for dataset in (dm.train_set, dm.val_set):
        for pair in dataset.pairs:
            for part in (pair.ids_a, pair.ids_b, pair.stats_a, pair.stats_b):
                if part is not None:
                    digest.update(np.ascontiguousarray(part).tobytes())
            digest.update(f"{pair.label},{pair.index};".encode())
            tokens += len(pair.ids_a) + (0 if pair.ids_b is None else len(pair.ids_b))
    return {
        "import_s": round(imported - started, 2),
        "tokenizer_load_s": round(loaded - imported, 2),
        "load_records_s": round(records_done - loaded, 2),
        "setup_s": round(built - records_done, 2),
        "build_s": round(built - loaded, 2),
        **{k: round(v, 2) for k, v in phases.items()},
        "ready_epoch": ready_epoch,
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mb": round(peak_rss_mb),
        "train_rows": len(dm.train_records),
        "val_rows": len(dm.val_records),
        "tokens": tokens,
        "first_batch": list(batch["input_ids"].shape),
        "pairs_sha256": digest.hexdigest()[:16],
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: enabled)"),
    }


# ---- parent --------------------------------------------------------------------------------------
def busy() -> list[str]:
    """Other benchmark/training processes running now (not `flock` wrappers still waiting for the lock)."""
    out = subprocess.run(["pgrep", "-fa", BUSY_PATTERN], capture_output=True, text=True).stdout.splitlines()
    running = []
    for line in out:
        argv = line.split()[1:]
        if argv and "python" in Path(argv[0]).name and "scale.py" not in line:
            running.append(line)
    return running


def prepare(work: Path, rows: int, seed: int, tokenizer_rows: int, vocab_size: int) -> tuple[Path, Path, dict]:
    """The data file and the trained tokenizer (reused when already there); never timed."""
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"train_{rows}_{seed}.csv"
    summary_path = csv.with_suffix(".json")
    if not (csv.exists() and summary_path.exists()):
        print(f"writing {rows} synthetic rows to {csv} ...", flush=True)
        result = subprocess.run([sys.executable, "-m", "pref_lightning.data.synthetic", "--rows", str(rows), "--seed",
                                 str(seed), "--out", str(csv)], cwd=REPO, capture_output=True, text=True, check=True)
        summary_path.write_text(result.stdout)
    summary = json.loads(summary_path.read_text())
    tokenizer_dir = work / f"tokenizer_{rows}_{seed}_{tokenizer_rows}_{vocab_size}"
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        print(f"training the tiny tokenizer (vocab {vocab_size}) on the texts of {tokenizer_rows} rows ...", flush=True)
        import pandas as pd

        from pref_lightning.data.records import records_from_frame
        from pref_lightning.data.tokenizers import cached_trained_tokenizer

        frame = pd.read_csv(csv, dtype=str, keep_default_na=False, na_filter=False, nrows=tokenizer_rows)
        texts = [t for r in records_from_frame(frame, csv, True) for t in (*r.prompt, *r.response_a, *r.response_b)]
        cached_trained_tokenizer(texts, vocab_size, work / "tokenizer_cache").save_pretrained(tokenizer_dir)
    return csv, tokenizer_dir, summary


def run_child(spec: dict) -> dict:
    started_epoch, started = time.time(), time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # process start -> datamodule ready (interpreter, imports, tokenizer load, build); the total also
    # counts the child's own checks (hashing every pair, a first batch) and its exit
    out["wall_s"] = round(out.pop("ready_epoch") - started_epoch, 2)
    out["process_total_s"] = round(wall, 2)
    return out


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=57_477)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--layout", default="siamese")
    parser.add_argument("--tokenizer-rows", type=int, default=5000, help="rows whose texts train the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--runs", default="nocache,cold,cached")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "pref_scale")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS} for full size)")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    csv, tokenizer_dir, summary = prepare(args.work, args.rows, args.seed, args.tokenizer_rows, args.vocab_size)
    if args.prepare_only:
        print(f"prepared {csv} and {tokenizer_dir}")
        return 0
    cache_dir = args.work / "pair_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # the cold run starts from an empty folder
    runs, others = {}, {}
    for name in args.runs.split(","):
        others[name] = busy()
        spec = {"csv": str(csv), "tokenizer": str(tokenizer_dir), "max_length": args.max_length,
                "layout": args.layout, "cache_dir": None if name == "nocache" else str(cache_dir)}
        print(f"run {name} ...", flush=True)
        runs[name] = run_child(spec)
        if name == "cold":
            runs[name]["cache_mb"] = folder_mb(cache_dir)

    digests = {r["pairs_sha256"] for r in runs.values()}
    contended = any(others.values())
    header = f"{'run':<8} {'wall s':>7} {'import s':>8} {'build s':>8} {'parse s':>8} {'tokenize s':>10} " \
             f"{'cpu s':>6} {'peak RSS MB':>11}"
    print(f"\nrows {args.rows} ({csv.stat().st_size / 2**20:.0f} MiB), max_length {args.max_length}, {args.layout}, "
          f"{os.cpu_count()} CPU cores{' (CONTENDED: other jobs ran)' if contended else ''}")
    print(header)
    for name, r in runs.items():
        print(f"{name:<8} {r['wall_s']:>7.1f} {r['import_s']:>8.1f} {r['build_s']:>8.1f} {r['parse_s']:>8.1f} "
              f"{r['tokenize_s']:>10.1f} {r['cpu_s']:>6.0f} {r['peak_rss_mb']:>11}")
    print("wall: process start -> datamodule ready; import: torch/lightning/transformers; build: load_records +\n"
          "attach_tokenizer + setup('fit'); parse: CSV + JSON turns -> records; tokenize: fast-tokenizer calls")
    checks = {}
    if "cold" in runs:
        checks["cold_wall_s"] = (runs["cold"]["wall_s"], TARGETS["cold_s"])
        checks["cold_build_s"] = (runs["cold"]["build_s"], TARGETS["cold_s"])
    if "cached" in runs:
        checks["cached_wall_s"] = (runs["cached"]["wall_s"], TARGETS["cached_s"])
        checks["cached_build_s"] = (runs["cached"]["build_s"], TARGETS["cached_s"])
    checks["peak_rss_mb"] = (max(r["peak_rss_mb"] for r in runs.values()), TARGETS["peak_rss_mb"])
    print("\ntargets (2-core reference machine): cold <= 90 s, cached <= 5 s, peak RSS <= 3 GiB")
    for key, (value, target) in checks.items():
        print(f"  {key:<15} {value:>8} vs {target:>6}: {'met' if value <= target else 'MISSED'}")
    print(f"identical pairs in every run: {len(digests) == 1}")

    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: enabled)"),
                    "contended": contended, "other_jobs": {k: v for k, v in others.items() if v},
                    "loadavg_after": os.getloadavg()},
        "data": {"rows": args.rows, "seed": args.seed, "mib": round(csv.stat().st_size / 2**20, 1),
                 "answer_chars_median": summary.get("answer_chars", {}).get("median")},
        "settings": {"max_length": args.max_length, "layout": args.layout, "val_fraction": 0.05,
                     "tokenizer": f"tiny BPE, vocab {args.vocab_size}, trained on {args.tokenizer_rows} rows"},
        "targets": TARGETS,
        "runs": runs,
        "checks": {k: {"value": v, "target": t, "met": v <= t} for k, (v, t) in checks.items()},
        "identical_pairs": len(digests) == 1,
    }
    out = args.out or (RESULTS if args.rows == 57_477 else args.work / "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
