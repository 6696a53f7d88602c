"""Where a number came from: the date, the code (commit), the libraries, the machine, the precision actually
used and the command. Training writes it to `metrics.json` (`run_info`), benchmarks to their results files."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def git_commit(folder: str | Path = REPO) -> str | None:
    """The commit checked out in `folder` (with `+dirty` when tracked files changed); None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores (those this process may use, and all), native bf16 on the CPU, GPU names."""
    import torch


    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cpu_cores": usable, "cpu_cores_total": os.cpu_count(),
            "cpu_native_bf16": bool(cpu_has_native_bf16()), "gpus": gpus, "platform": platform.platform()}


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a number depends on."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "lightning", "transformers", "tokenizers", "peft", "pref-lightning"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import torch

    out["torch"] = torch.__version__  # the build actually imported (+cpu, +cu124)
    return out


def command_line(script: str | None = None, overrides: list[str] | None = None) -> str:
    """The command that ran: `python SCRIPT overrides...` (Hydra's overrides when run by Hydra)."""
    if overrides is None:
        overrides = hydra_overrides()
    if script is None:
        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if overrides is None:
        overrides = sys.argv[1:]
    return " ".join(["python", script, *(shlex.quote(o) for o in overrides)])


def hydra_overrides() -> list[str] | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def run_info(precision: str | None, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The `run_info` block: date, commit, versions, machine, the precision actually used, the command."""
    return {"date": utc_now(), "precision": precision, "git_commit": git_commit(), "versions": versions(),
            "machine": machine(), "command": command if command is not None else command_line(), **extra}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    import torch

    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)
