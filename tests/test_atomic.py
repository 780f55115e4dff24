import os
import stat

import pytest

from pipeline import atomic


def test_outputs_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic.write_text(tmp_path / "report.md", "# hi\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert out.read_text() == "# hi\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_json(tmp_path / "metrics.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
