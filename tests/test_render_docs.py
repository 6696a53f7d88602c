"""benchmarks/render_docs.py: every table README.md and benchmarks/README.md quote between results markers
is what its results file says (`--check`), and a changed number is caught."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO, load_benchmark


def test_published_tables_match_their_results_files():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render_docs.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_number_is_drift_and_render_restores_it(tmp_path, monkeypatch, capsys):
    render_docs = load_benchmark("render_docs")
    original = (REPO / "benchmarks" / "README.md").read_text()
    assert "<!-- results:scale -->" in original and "<!-- results:real_5fold -->" in original
    doc = tmp_path / "README.md"
    row = "| **the same with `model.anchor_fallback` (chosen on the scored fold)** | "
    assert row + "1.0355 |" in original
    doc.write_text(original.replace(row + "1.0355 |", row + "1.0300 |"))
    monkeypatch.setattr(render_docs, "DOCUMENTS", (doc,))
    monkeypatch.setattr(render_docs, "REPO", tmp_path)
    assert render_docs.main(["--check"]) == 1
    assert "README.md: real_5fold" in capsys.readouterr().err
    assert render_docs.main([]) == 0 and doc.read_text() == original
    assert render_docs.main(["--check"]) == 0
