import errno
import json
import os

import pytest

from ssrengine.errors import DiskFullError, InputError
from ssrengine.io import (
    RowWriter,
    atomic_write_jsonl,
    atomic_write_text,
    iter_jsonl,
    read_rows,
    read_text,
)

# Characters that str.splitlines() splits on but json.dumps(ensure_ascii=False) writes raw.
SEPARATORS = "a\u2028b\u2029c\u0085d\x1ce\x1df\x1eg\x0bh\x0ci"


def _rows(n=4):
    return [{"id": f"r{i}", "text": f"{i}:{SEPARATORS}\r\n{SEPARATORS}"} for i in range(n)]


def test_line_separators_round_trip_through_every_reader(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowWriter(path) as w:
        for r in _rows()[:2]:
            w.write(r)
    with RowWriter(path) as w:  # reopening recovers the rows written so far
        assert list(w.rows.values()) == _rows()[:2]
        for r in _rows()[2:]:
            w.write(r)
    assert read_rows(path) == _rows()
    assert [obj for _, obj in iter_jsonl(path)] == _rows()
    assert [line for line, _ in iter_jsonl(path)] == [1, 2, 3, 4]
    atomic_write_jsonl(tmp_path / "whole.jsonl", _rows())
    assert read_rows(tmp_path / "whole.jsonl") == _rows()


def test_torn_last_line_with_separators_is_cut_on_reopen(tmp_path):
    path = tmp_path / "rows.jsonl"
    atomic_write_jsonl(path, _rows(2))
    with open(path, "ab") as f:
        f.write(json.dumps(_rows(3)[2], ensure_ascii=False).encode()[:-5])  # killed mid-write
    assert read_rows(path) == _rows(2)
    with RowWriter(path) as w:
        w.write(_rows(3)[2])
    assert read_rows(path) == _rows(3)


@pytest.mark.parametrize("reader", [read_rows, lambda p: list(iter_jsonl(p)), RowWriter])
def test_non_utf8_names_file_line_and_byte_offset(tmp_path, reader):
    path = tmp_path / "gen.jsonl"
    first = b'{"id": "a", "text": "ok"}\n'
    path.write_bytes(first + b'{"id": "b", "text": "caf\xe9"}\n')
    before = path.read_bytes()
    with pytest.raises(InputError) as e:
        reader(path)
    offset = len(first) + len(b'{"id": "b", "text": "caf')
    assert str(e.value).startswith(f"{path}:2: not valid UTF-8: byte 0xe9 at byte offset {offset}")
    assert path.read_bytes() == before


def test_read_text_of_latin1_names_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes("[train]\n# Zürich\n".encode("latin-1"))
    with pytest.raises(
        InputError, match=r"c\.toml:2: not valid UTF-8: byte 0xfc at byte offset 11"
    ):
        read_text(path)


def test_wrong_shape_row_is_corrupt(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"v\.jsonl:2: corrupt row"):
        read_rows(path)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_full_disk_names_path_and_size_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "build_stats.json"
    path.write_text("old\n")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFullError) as e:
        atomic_write_text(path, "x" * 3000)
    assert str(e.value).startswith(f"{path}: disk full: writing this needs 2.9 KiB, ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build_stats.json"]
    assert path.read_text() == "old\n"


def test_row_write_on_full_disk_keeps_earlier_rows(tmp_path, monkeypatch):
    path = tmp_path / "gen.jsonl"
    w = RowWriter(path)
    w.write({"id": "a"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]) and _enospc())
    with pytest.raises(DiskFullError, match=r"gen\.jsonl: disk full: writing this needs 12 bytes"):
        w.write({"id": "b"})
    w.close()
    monkeypatch.undo()
    with RowWriter(path) as w:  # the torn row is cut on reopen; the rerun writes it again
        assert list(w.rows) == ["a"]
        w.write({"id": "b"})
    assert read_rows(path) == [{"id": "a"}, {"id": "b"}]


def test_dead_writers_temp_files_are_removed(tmp_path):
    dead = tmp_path / ".x.json.tmp999999999"
    dead.write_text("partial")
    atomic_write_text(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
