"""benchmarks/timings.py: what it keeps of a pytest run besides the closing line."""

from __future__ import annotations

from .conftest import load_benchmark

PYTEST_OUTPUT = """........                                                                 [100%]
============================= slowest 30 durations =============================
95.31s call     tests/test_readme_commands.py::test_command[train]
12.02s setup    tests/test_module.py::test_fit

(28 durations < 0.005s hidden.  Use -vv to show these durations.)
=========================== short test summary info ============================
SKIPPED [1] tests/test_loggers.py:48: wandb is not installed (optional extra)
575 passed, 4 skipped in 1692.67s (0:28:12)
"""


def test_slowest_keeps_the_durations_table_and_nothing_else():
    timings = load_benchmark("timings")
    assert timings.slowest(PYTEST_OUTPUT) == [
        "95.31s call     tests/test_readme_commands.py::test_command[train]",
        "12.02s setup    tests/test_module.py::test_fit"]
    assert timings.slowest("575 passed in 3.0s") == []  # a run without --durations
