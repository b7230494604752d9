"""A huge record stops the run before it is parsed or tokenized (data.max_record_bytes): a
64 MB JSONL line is refused after reading the limit's worth of it, naming file, line and key;
other formats are measured by the text of their fields."""

from __future__ import annotations

import json

import pytest

from ssrengine.core.errors import InputError
from ssrengine.data.records import load_examples, text_bytes
from tests.test_faults import Ctx, _one_error_line, cli
from tests.tiny import records, write_jsonl


def _huge_record(n_bytes: int) -> dict:
    rec = records(2)[1]
    rec["documents"][0]["text"] = "Acme was founded in Oslo. " * (n_bytes // 26)
    return rec


def test_a_huge_jsonl_line_fails_with_one_line_naming_file_line_and_key(tiny_model_dir, tmp_path):
    rows = records(3)
    lines = [json.dumps(r) for r in rows]
    lines[1] = json.dumps(_huge_record(64 << 20))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir)
    ctx.write_config()
    r = cli(ctx, "generate --config {cfg}", timeout=120)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r)
    assert f"{tmp_path}/data.jsonl:2: line longer than data.max_record_bytes=1048576 bytes" in line
    assert not (ctx.run / "generations.jsonl").exists()


def test_the_limit_is_configurable_and_exact(tmp_path):
    rows = records(2)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    longest = max(len(json.dumps(r).encode()) for r in rows)
    assert len(load_examples(path, max_record_bytes=longest)) == 2  # a line of the limit is fine
    with pytest.raises(
        InputError,
        match=rf"d\.jsonl:\d: line longer than data\.max_record_bytes={longest - 1} bytes",
    ):
        load_examples(path, max_record_bytes=longest - 1)
    assert len(load_examples(path, max_record_bytes=0)) == 2  # 0 = no limit


def test_other_formats_count_the_text_of_a_record(tmp_path):
    rows = [records(3)[0], _huge_record(2 << 20), records(3)[2]]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    size = text_bytes(rows[1])
    with pytest.raises(InputError) as e:
        load_examples(path, max_record_bytes=1 << 20)
    assert str(e.value) == (
        f"{path}:2: record holds {size} bytes of text, more than data.max_record_bytes=1048576 "
        "(raise data.max_record_bytes if it is meant to be this long)"
    )
    assert len(load_examples(path, max_record_bytes=size)) == 3
