"""tests/warm.py: each command runs in its own forked process with its own folder, environment, argv and
exit status, as `python ...` would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .warm import WarmPython


def test_each_fork_has_its_own_folder_environment_argv_and_exit_status(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(os.getcwd(), os.environ['X'], sys.argv, __name__)\n"
                      "sys.stderr.write('to stderr\\n')\nsys.exit(int(sys.argv[1]))\n")
    (tmp_path / "a").mkdir()
    with WarmPython(preload=()) as warm:
        first = warm.run([sys.executable, str(script), "3"], cwd=tmp_path / "a", env={**os.environ, "X": "one"})
        second = warm.run([sys.executable, str(script), "0"], cwd=tmp_path, env={**os.environ, "X": "two"})
        failing = warm.run([sys.executable, str(script), "x"], cwd=tmp_path,
                           env={**os.environ, "X": "3"})
        module = warm.run([sys.executable, "-m", "json.tool", "--help"], cwd=tmp_path)
        nowhere = warm.run([sys.executable, str(script), "0"], cwd=tmp_path / "missing")
        with pytest.raises(subprocess.TimeoutExpired):
            warm.run([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, timeout=1)
    assert first.returncode == 3 and f"{tmp_path / 'a'} one ['{script}', '3'] __main__" in first.stdout
    assert first.stderr == "to stderr\n" and "to stderr" not in first.stdout
    assert second.returncode == 0 and f"{tmp_path} two" in second.stdout
    assert failing.returncode == 1 and "Traceback" in failing.stderr and "ValueError" in failing.stderr
    assert module.returncode == 0 and "usage" in module.stdout
    assert nowhere.returncode == 1 and "FileNotFoundError" in nowhere.stderr


def test_commands_other_than_python_are_refused():
    with pytest.raises(ValueError, match="not a python command"):
        WarmPython(preload=()).run(["ruff", "check", "."], cwd=".")


def test_a_variable_read_at_start_up_gets_a_new_process_that_reads_it(tmp_path):
    code = "import sys; print(sys.flags.hash_randomization)"
    with WarmPython(env={k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}, preload=()) as warm:
        forked = warm.run([sys.executable, "-c", code], cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"})
        fixed = warm.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert forked.stdout.strip() == "1" and fixed.stdout.strip() == "0"
