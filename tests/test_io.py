import errno
import json
import os

import pytest

from ssrengine.core.errors import DiskFullError, InputError
from ssrengine.core.io import (
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


def test_generated_text_with_separators_round_trips_through_the_stages(tiny_model_dir, tmp_path):
    """Model output carrying the separators: generate, judge and build write it and read it
    back on resume (the old splitlines() reader failed: 'corrupt row ... delete the file')."""
    from dataclasses import replace

    from ssrengine.core.config import GenerationConfig, ModelConfig
    from ssrengine.core.config_load import load_config
    from ssrengine.data.records import load_examples
    from ssrengine.generation.hf import HFGenerator
    from ssrengine.rehearsal.build import run_build
    from ssrengine.rehearsal.judge import RuleJudge
    from ssrengine.rehearsal.stages import generate_rows, judge_rows
    from tests.tiny import records, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    cfg = load_config(None, [f"--model.path={tiny_model_dir}", f"--data.train_file={data}"])
    examples = load_examples(data)

    class Separating:
        """The tiny model's real answers with the separators a model may emit appended."""

        backend, model = "hf", str(tiny_model_dir)

        def __init__(self):
            self.inner, self.calls = (
                HFGenerator(ModelConfig(path=str(tiny_model_dir)), GenerationConfig(batch_size=4)),
                0,
            )

        def generate(self, requests, sampling):
            self.calls += 1
            outs = self.inner.generate(requests, sampling)
            return [replace(o, text=o.text + SEPARATORS) for o in outs]

    gen = Separating()
    rows = generate_rows(cfg, tmp_path, examples, gen)
    assert generate_rows(cfg, tmp_path, examples, gen) == rows and gen.calls == 1
    assert all(r.response.endswith(SEPARATORS) for r in rows.values())
    # Gold = the model's own answer, so the judge accepts it and build rehearses that text.
    own = [replace(e, response=rows[e.id].response, answerable=None) for e in examples]
    answers = {e.id: e.response for e in own}
    first = judge_rows(cfg, tmp_path, own, answers, RuleJudge(0.3))
    assert judge_rows(cfg, tmp_path, own, answers, RuleJudge(0.3)) == first
    run_build(cfg, tmp_path, own)
    rehearsal = read_rows(tmp_path / "rehearsal.jsonl")
    assert [(r["source"], r["target"]) for r in rehearsal] == [("self", answers[e.id]) for e in own]


def test_checkpoint_on_full_disk_needs_at_least_what_it_wrote(tmp_path):
    """A LoRA run's final checkpoint adds the merged model to the adapter-only ones before it:
    the space it needs is then more than the newest complete checkpoint, at least what it wrote."""
    from ssrengine.core.diskfull import disk_full_error

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-1").mkdir(parents=True)
    (ckpts / "step-1" / "adapter.bin").write_bytes(b"x" * 1000)
    (ckpts / ".step-2.tmp").mkdir()
    (ckpts / ".step-2.tmp" / "model.safetensors").write_bytes(b"x" * 5000)
    e = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert str(e).startswith(
        f"{ckpts / '.step-2.tmp'}: disk full: writing this needs more than 4.9 KiB"
    )
    assert not (ckpts / ".step-2.tmp").exists() and (ckpts / "step-1").is_dir()
    # A smaller partial write: the newest complete checkpoint's size.
    (ckpts / ".step-2.tmp").mkdir()
    (ckpts / ".step-2.tmp" / "a").write_bytes(b"x" * 10)
    e = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert "writing this needs 1000 bytes" in str(e)
