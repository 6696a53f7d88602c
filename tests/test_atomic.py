import pytest

from pref_lightning.core.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_is_readable(tmp_path):
    target = tmp_path / "out" / "submission.csv"
    atomic_write_text(target, "id\n1\n")
    atomic_write_text(target, "id\n2\n")
    assert target.read_text() == "id\n2\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["submission.csv"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
