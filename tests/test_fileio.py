"""Result files: atomic whole-file writes with ordinary permissions, and JSON lines that survive a cut-off write."""

import json
import os
import stat

import pytest

from blindspot.errors import BlindspotError
from blindspot.fileio import append_jsonl, atomic_write_text, read_jsonl, write_json


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_writes_get_the_umask_mode_and_leave_no_temporary_file(tmp_path, umask_027):
    path = write_json(tmp_path / "sub" / "results.json", {"rate": float("nan"), "n": 3})
    assert json.loads(path.read_text()) == {"rate": None, "n": 3}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~027, as open() would give, not mkstemp's 0600
    atomic_write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_jsonl_drops_a_cut_off_last_line_but_not_a_bad_middle_one(tmp_path):
    path = tmp_path / "records.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with path.open("a") as fh:
        fh.write('{"a": 3, "b"')  # a crash mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(BlindspotError, match="line 2"):
        read_jsonl(path)
