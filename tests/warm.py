"""Run `python SCRIPT ...` / `python -m MODULE ...` / `python -c CODE ...` commands in forks of one warm Python process.

Every new Python process of this project spends ~6 s importing torch, Lightning, transformers and Hydra
before it does anything (on this project's 2-core machine); the README commands alone start ~45 of them. A warm
server imports those once, then forks one child per command: the child changes to the command's folder,
takes its environment, points its stdout and stderr at files and runs the script as `__main__` (`runpy`), so
each command still runs in its own process, from a clean interpreter state except for the modules already
imported, and exits through the normal interpreter shutdown (atexit handlers, loggers' flushes). A command
that starts processes itself (DDP, multirun) starts ordinary ones.

What a fork does not get: a new hash seed (all forks share the server's) and new values of environment
variables read at start-up or import (READ_AT_START): a command that changes one of those gets a server of its
own (`run`) or, given to one `WarmPython`, a plain subprocess. Forking is safe because the server imports
modules only: it runs no torch operation, so no OpenMP thread pool exists when it forks. Commands that are not
`python ...` (ruff, pip) are not for this server.

    with WarmPython(env) as warm:
        done = warm.run([sys.executable, "train.py", "trainer.max_epochs=1"], cwd=folder, timeout=600)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what every command of this project imports first (the slow part of its start-up)
PRELOAD = ("torch", "lightning", "transformers", "hydra", "pandas", "pref_lightning.train.training",
           "pref_lightning.predict.prediction")

# environment variables read when Python starts or a module is imported (PYTHONPATH, PYTHONHASHSEED, HF_HUB_*,
# OMP_NUM_THREADS, ...): a command whose values differ from the server's runs as a plain new process
READ_AT_START = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "OMP_", "MKL_", "CUDA", "NCCL", "TOKENIZERS")


class WarmPython:
    """A server process that forks one child per command; `run` mirrors `subprocess.run(capture_output=True,
    text=True)`. `env` is the server's environment (sys.path is fixed at its start: PYTHONPATH must be in it)."""

    def __init__(self, env: dict[str, str] | None = None, preload: tuple[str, ...] = PRELOAD):
        self.env = dict(os.environ if env is None else env)
        self.preload = preload
        self.server: subprocess.Popen | None = None
        self.logs = Path()  # the folder of the forks' output files, made at __enter__

    def __enter__(self) -> WarmPython:
        self.logs = Path(tempfile.mkdtemp(prefix="warm-python-"))
        self.server = subprocess.Popen([sys.executable, __file__, *self.preload], env=self.env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self.server.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"warm Python server did not start: {ready!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
            self.server = None
            shutil.rmtree(self.logs, ignore_errors=True)

    def run(self, cmd: list[str], cwd: str | Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `cmd` ([python, script | -m module | -c code, args...]) in a fresh fork (`env`: os.environ if
        None); returns its exit status and output. Raises subprocess.TimeoutExpired (the fork's process group
        is killed) past `timeout` s."""
        if Path(cmd[0]).name not in ("python", "python3", Path(sys.executable).name):
            raise ValueError(f"not a python command: {cmd}")
        env = dict(os.environ if env is None else env)
        read_at_start = sorted(k for k in set(env) | set(self.env) if k.startswith(READ_AT_START)
                               and k != "PYTHONPATH" and env.get(k) != self.env.get(k))
        # PYTHONPATH: the fork imports with the server's sys.path, so only a folder not on it is a difference
        read_at_start += sorted(set(_paths(env)) - set(_paths(self.env)))
        if read_at_start:  # the server imported its modules with other values: only a new process sees these
            return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        out = self.logs / str(time.monotonic_ns())
        request = {"argv": cmd[1:], "cwd": str(cwd), "env": env, "out": str(out), "timeout": timeout}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = json.loads(self.server.stdout.readline())
        stdout, stderr = (out.with_suffix(s).read_text(errors="replace") if out.with_suffix(s).exists() else ""
                          for s in (".out", ".err"))
        for suffix in (".out", ".err"):
            out.with_suffix(suffix).unlink(missing_ok=True)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, reply["returncode"], stdout=stdout, stderr=stderr)


def _paths(env: dict[str, str]) -> list[str]:
    return [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


_SERVERS: dict[tuple, WarmPython] = {}


def run(cmd: list[str], cwd: str | Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)` for a python
    command, in a fork of a warm server of this test session: one server per set of start-up variables
    (READ_AT_START, e.g. PYTHONWARNINGS=ignore or not), started on first use, stopped at exit; each imports
    from the repository and the command's PYTHONPATH."""
    from .conftest import REPO  # the repository the tests import from

    env = dict(os.environ if env is None else env)
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(READ_AT_START) and k != "PYTHONPATH"))
    paths = [str(REPO), *(p for p in _paths(env) if p != str(REPO))]
    key += tuple(paths)
    if key not in _SERVERS:
        _SERVERS[key] = WarmPython({**env, "PYTHONPATH": os.pathsep.join(paths)}).__enter__()
        atexit.register(_SERVERS[key].__exit__)
    return _SERVERS[key].run(cmd, cwd=cwd, env=env, timeout=timeout)


def _serve(preload: list[str]) -> None:
    import importlib
    import runpy

    for name in preload:
        importlib.import_module(name)
    replies = sys.stdout
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the command's own process: no try/except, so it ends as `python ...` would
            os.setpgrp()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, suffix in ((1, ".out"), (2, ".err")):  # first, so that even a missing cwd is reported there
                os.dup2(os.open(request["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own stdin, never closed)
            argv = request["argv"]
            if argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                sys.path.insert(0, "")  # as `python -c` sets it
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            elif argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path.insert(0, os.getcwd())  # as `python -m` sets it
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python script.py` sets it
                runpy.run_path(argv[0], run_name="__main__")
            sys.exit(0)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}),
              file=replies, flush=True)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/) is not where the commands import from
    _serve(sys.argv[1:])
