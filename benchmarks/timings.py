"""Wall times of the README's two main commands, written to benchmarks/results/timings.json.

    python benchmarks/timings.py --suite    # the test command README gives (python -m pytest -q): minutes
    python benchmarks/timings.py --train    # the embedded default (python train.py) into a temporary folder

Each run records its wall seconds, its exit status, the closing line (pytest's counts) or the run's
validation log loss, with the date, commit, machine and command; README's Timings table is rendered
from the file (`benchmarks/render_docs.py`). Run it alone on the machine: a second job on 2 cores
slows both several times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pref_lightning.core import runinfo  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "timings.json"


def timed(command: list[str], cwd: Path) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, done.stdout + done.stderr


def slowest(out: str) -> list[str]:
    """The lines of pytest's "slowest durations" table (pyproject's `--durations`): where the suite's time goes."""
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if "slowest" in line and "durations" in line), None)
    if start is None:
        return []
    table = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("="):
            break
        table.append(line.strip())
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="store_true", help="time python -m pytest -q")
    parser.add_argument("--train", action="store_true", help="time python train.py (embedded default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": runinfo.git_commit(),
            "machine": runinfo.machine()}
    failed = False
    if args.suite:
        code, seconds, out = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], REPO)
        closing = next((line for line in reversed(out.splitlines()) if " passed" in line or " failed" in line), "")
        stored["suite"] = {**info, "command": "python -m pytest -q", "exit_status": code,
                           "wall_seconds": round(seconds, 1), "closing_line": closing.strip("= "),
                           "slowest": slowest(out)}
        print(f"suite: {stored['suite']}")
        failed |= code != 0
        if code != 0:
            print(out[-6000:])
    if args.train:
        with tempfile.TemporaryDirectory(prefix="pref_timing_") as folder:
            code, seconds, out = timed([sys.executable, "train.py", f"hydra.run.dir={folder}/run"], REPO)
            metrics_path = Path(folder) / "run" / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        stored["embedded_default"] = {**info, "command": "python train.py", "exit_status": code,
                                      "wall_seconds": round(seconds, 1),
                                      **{k: metrics.get(k) for k in ("val_log_loss", "val_log_loss_calibrated",
                                                                     "oracle_log_loss", "prior_log_loss")},
                                      "precision": (metrics.get("run_info") or {}).get("precision")}
        print(f"embedded default: {stored['embedded_default']}")
        failed |= code != 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
