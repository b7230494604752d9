"""data.train_file in every accepted format and record shape, built on disk with the real
writers (`datasets`, pyarrow, csv), read back into the same examples; bad input is one line."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys

import datasets
import pytest

from ssrengine.core.errors import InputError
from ssrengine.data.records import load_examples

RECORDS = [
    {
        "id": "a-1",
        "documents": [{"title": "Acme", "text": "Acme was founded in 1987."}],
        "messages": [{"role": "user", "content": "When was Acme founded?"}],
        "response": "Founded in 1987.",
        "answerable": True,
    },
    {
        "id": "a-2",
        "documents": [{"title": "", "text": "Bolt makes lamps."}],
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "What does Bolt make?"},
            {"role": "assistant", "content": "Lamps."},
            {"role": "user", "content": "Who runs it?"},
        ],
        "response": "The documents do not say.",
        "answerable": False,
    },
]


def _want(records=RECORDS):
    return [r | {} for r in records]


def _got(path, **kw):
    return [e.to_record() for e in load_examples(path, **kw)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _quiet():
    datasets.disable_progress_bars()


def test_jsonl_and_gzipped_jsonl(tmp_path):
    plain = _jsonl(tmp_path / "t.jsonl", RECORDS)
    packed = tmp_path / "t.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert _got(plain) == _got(packed) == _want()


def test_json_list_and_json_lines_under_a_json_name(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS, indent=2))
    _quiet()
    datasets.Dataset.from_list(RECORDS).to_json(tmp_path / "lines.json")  # JSON Lines
    assert _got(tmp_path / "list.json") == _got(tmp_path / "lines.json") == _want()


def test_csv_with_json_cells_and_prompt_completion_csv(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RECORDS[0]))
        w.writeheader()
        for r in RECORDS:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    assert _got(path) == _want()

    _quiet()
    rows = [{"prompt": "When was Acme founded?", "completion": "Founded in 1987."}]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "pc.csv", index=False)
    (got,) = load_examples(tmp_path / "pc.csv")
    assert got.messages == [{"role": "user", "content": "When was Acme founded?"}]
    assert got.response == "Founded in 1987." and got.id.startswith("sha-")


def test_parquet_arrow_save_to_disk_and_hub_directory(tmp_path):
    _quiet()
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(tmp_path / "t.parquet")
    assert _got(tmp_path / "t.parquet") == _want()

    ds.save_to_disk(tmp_path / "saved")
    assert _got(tmp_path / "saved") == _want()
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert _got(arrow) == _want()

    test = datasets.Dataset.from_list(RECORDS[1:])
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(tmp_path / "dict")
    assert _got(tmp_path / "dict", split="train") == _want()
    assert _got(tmp_path / "dict", split="test") == _want(RECORDS[1:])

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    ds.to_parquet(hub / "data" / "train-00000-of-00001.parquet")
    test.to_parquet(hub / "data" / "test-00000-of-00001.parquet")
    assert _got(hub, split="train") == _want()
    assert _got(hub, split="test") == _want(RECORDS[1:])


def test_hub_directory_of_jsonl_files(tmp_path):
    _jsonl(tmp_path / "train.jsonl", RECORDS)
    _jsonl(tmp_path / "validation.jsonl", RECORDS[:1])
    assert _got(tmp_path, split="validation") == _want(RECORDS[:1])


def test_unknown_split_names_the_ones_there(tmp_path):
    _quiet()
    ds = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": ds, "dev": ds}).save_to_disk(tmp_path / "dict")
    with pytest.raises(InputError, match=r"no split 'test'; it has dev, train \(set data.split\)"):
        load_examples(tmp_path / "dict", split="test")


TRL_CONVERSATIONAL = [
    {
        "messages": [
            {"role": "user", "content": "When was Acme founded?"},
            {"role": "assistant", "content": "Founded in 1987."},
        ]
    }
]
TRL_PROMPT_COMPLETION = [
    {"prompt": "When was Acme founded?", "completion": "Founded in 1987."},
    {
        "prompt": [{"role": "user", "content": "When was Acme founded?"}],
        "completion": [{"role": "assistant", "content": "Founded in 1987."}],
    },
]
NATIVE = {
    "documents": [],
    "messages": [{"role": "user", "content": "When was Acme founded?"}],
    "response": "Founded in 1987.",
}


@pytest.mark.parametrize("rows", [TRL_CONVERSATIONAL, TRL_PROMPT_COMPLETION])
def test_trl_shapes_are_the_native_record(tmp_path, rows):
    got = _got(_jsonl(tmp_path / "t.jsonl", rows))
    assert [{k: v for k, v in r.items() if k != "id"} for r in got] == [NATIVE] * len(rows)


def test_missing_id_is_a_content_hash_stable_across_formats(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in RECORDS]
    from_jsonl = load_examples(_jsonl(tmp_path / "t.jsonl", rows))
    _quiet()
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "t.parquet")
    from_parquet = load_examples(tmp_path / "t.parquet")
    ids = [e.id for e in from_jsonl]
    assert ids == [e.id for e in from_parquet]
    assert all(i.startswith("sha-") for i in ids) and len(set(ids)) == 2
    # the same content twice: both kept, the second one numbered
    twice = load_examples(_jsonl(tmp_path / "twice.jsonl", [rows[0], rows[0]]))
    assert [e.id for e in twice] == [ids[0], f"{ids[0]}-2"]


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"prompt": "q", "completion": "a", "response": "a"}, "prompt", "or prompt + completion"),
        ({"completion": "a"}, "prompt", "missing"),
        ({"prompt": "q", "completion": ""}, "completion", "empty response"),
        (
            {"prompt": "q", "completion": [{"role": "user", "content": "a"}]},
            "completion",
            "one assistant message",
        ),
        (
            {"prompt": [{"role": "user", "content": ""}], "completion": "a"},
            "prompt[0].content",
            "empty content",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "messages",
            "no turn before the gold answer",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "messages[1].content",
            "empty content",
        ),
    ],
)
def test_bad_trl_record_names_row_and_field(tmp_path, row, field, needle):
    path = _jsonl(tmp_path / "t.jsonl", [RECORDS[0], row])
    with pytest.raises(InputError) as e:
        load_examples(path)
    assert f"{path}:2: field '{field}'" in str(e.value) and needle in str(e.value), str(e.value)


def test_bad_parquet_row_names_file_row_and_field(tmp_path):
    bad = json.loads(json.dumps(RECORDS))
    bad[1]["messages"][1]["content"] = ""
    _quiet()
    datasets.Dataset.from_list(bad).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(InputError) as e:
        load_examples(tmp_path / "t.parquet")
    assert str(e.value) == (
        f"{tmp_path / 't.parquet'}:2: field 'messages[1].content': missing or empty content"
    )


def test_bad_csv_cell_names_line_and_field(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,messages,response\nx,"[{""role"": ""user""",r\n')
    with pytest.raises(InputError, match=rf"{path}:2: field 'messages': cell is not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        (
            "t.jsonl",
            gzip.compress(b'{"id": "x"}\n', mtime=0),
            "gzip-compressed; name it t.jsonl.gz",
        ),
        ("t.csv", b"id,response\nx,caf\xe9\n", "not valid UTF-8"),
        ("t.jsonl.gz", b'{"id": "x"}\n', "corrupt gzip file"),
        ("t.json", b'{"id": 1', "malformed JSON"),
        ("t.xlsx", b"PK", "unknown data format '.xlsx'"),
        ("t.parquet", b"not parquet", "cannot read it"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError) as e:
        load_examples(tmp_path / name)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_without_datasets_the_error_names_the_extra(tmp_path, monkeypatch):
    _quiet()
    datasets.Dataset.from_list(RECORDS).to_parquet(tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(
        InputError, match=r"needs the `datasets` library: pip install 'ssrengine\[data\]'"
    ):
        load_examples(tmp_path / "t.parquet")
    # JSONL, JSON and CSV need nothing extra
    assert _got(_jsonl(tmp_path / "t.jsonl", RECORDS)) == _want()


def test_cli_exits_2_with_one_line_on_a_bad_parquet_row(tmp_path):
    bad = json.loads(json.dumps(RECORDS))
    del bad[0]["documents"][0]["text"]
    _quiet()
    datasets.Dataset.from_list(bad).to_parquet(tmp_path / "t.parquet")
    cmd = [
        sys.executable,
        "-m",
        "ssrengine",
        "generate",
        f"--data.train_file={tmp_path / 't.parquet'}",
    ]
    cmd.append(f"--run.dir={tmp_path / 'run'}")
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 't.parquet'}:1: field 'documents[0]': expected an object with a string 'text'"
    )


def test_reading_shows_no_datasets_bar(tmp_path, capfd):
    _quiet()
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(tmp_path / "t.parquet")
    ds.save_to_disk(tmp_path / "saved")
    datasets.enable_progress_bars()
    capfd.readouterr()
    load_examples(tmp_path / "t.parquet")
    load_examples(tmp_path / "saved")
    assert capfd.readouterr().err == ""
    assert not datasets.utils.are_progress_bars_disabled()  # the user's setting is back
    _quiet()
