"""Training data files as rows: ``(row number, object)`` pairs for `ssrengine.data.records` to validate.

`read_rows` picks the reader by extension or directory layout:

- ``.jsonl`` / ``.ndjson`` (``.gz`` too): one JSON object per line; the number is the line.
- ``.json`` (``.gz`` too): a list of objects (or an object holding one such list, as
  ``{"data": [...]}``), the number is the item; JSON Lines under a ``.json`` name (what
  ``Dataset.to_json`` writes) is read as JSONL.
- ``.csv`` / ``.tsv`` (``.gz`` too): a header row, then one record per row; the number is the
  row's first line. Cells holding lists (``messages``, ``documents``, a message-list
  ``prompt`` / ``completion``) are JSON text; ``answerable`` is ``true`` / ``false`` / empty.
- ``.parquet``, ``.arrow``: through the `datasets` library; the number is the row (from 1).
- a directory written by ``save_to_disk`` (``dataset_dict.json`` or ``state.json`` inside), or a
  Hub-style dataset directory (``data/train-*.parquet``, ``train.jsonl``, a README with
  ``configs``...) as `datasets.load_dataset` reads it; ``split`` picks the split.

The formats that need `datasets` (``pip install 'ssrengine[data]'``) say so in one line when it
is missing. Standard library only (it sits beside `io`, below `data`); `datasets` is imported
on first use.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.io import iter_jsonl

Rows = Iterator[tuple[int, dict[str, Any]]]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
ARROW_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
# CSV cells that hold JSON lists; every other cell is text.
_CSV_JSON_FIELDS = ("messages", "documents", "prompt", "completion")
_EXTRA = "pip install 'ssrengine[data]'"
RECORD_LIMIT = "data.max_record_bytes"


def _suffix(path: Path) -> str:
    """The format suffix, ``.gz`` looked through: ``x.jsonl.gz`` -> ``.jsonl``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path) -> Any:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


_TEXT_SUFFIXES = (*JSONL_SUFFIXES, ".json", *CSV_SUFFIXES)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _decode_errors(path: Path, rows: Rows) -> Rows:
    """A file that is not UTF-8 text (or a corrupt gzip) is one line, not a traceback."""
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise InputError(
            f"not valid UTF-8 ({e.reason}); save the file as UTF-8", file=str(path)
        ) from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise InputError(f"corrupt gzip file: {e}", file=str(path)) from None


def _json_rows(path: Path) -> Rows:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            yield from iter_jsonl(path)
            return
        raise InputError(f"malformed JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}: the one list it holds
    if not isinstance(data, list):
        raise InputError("expected a list of record objects (or JSON Lines)", file=str(path))
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise InputError(f"item {i} is not a JSON object", file=str(path), line=i)
        yield i, obj


def _csv_cell(name: str, value: str | None, *, file: str, line: int) -> Any:
    if value is None or value == "":
        return None
    if name in _CSV_JSON_FIELDS and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(
                f"cell is not valid JSON: {e.msg}", file=file, line=line, field=name
            ) from None
    if name == "answerable":
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise InputError(f"expected true/false, got {value!r}", file=file, line=line, field=name)
    return value


def _csv_rows(path: Path, delimiter: str) -> Rows:
    file = str(path)
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = 2  # after the header
        try:
            for raw in reader:
                if None in raw:
                    raise InputError(
                        f"more cells than the {len(reader.fieldnames or [])} header columns",
                        file=file,
                        line=start,
                    )
                yield (
                    start,
                    {k: _csv_cell(k, v, file=file, line=start) for k, v in raw.items() if k},
                )
                start = reader.line_num + 1
        except csv.Error as e:
            raise InputError(f"malformed CSV: {e}", file=file, line=reader.line_num) from None


def _hf_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _need_datasets(path: Path, what: str) -> Any:
    ds = _hf_datasets()
    if ds is None:
        raise InputError(f"reading {what} needs the `datasets` library: {_EXTRA}", file=str(path))
    return ds


def _pick_split(path: Path, splits: dict[str, Any], split: str | None) -> Any:
    if split is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        split = "train"
    if split not in splits:
        raise InputError(
            f"no split {split!r}; it has {', '.join(sorted(splits))} (set data.split)",
            file=str(path),
            field="data.split",
        )
    return splits[split]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet(ds: Any) -> Iterator[None]:
    """`datasets`' own bars off while it reads: ours is the one bar, a nested one garbles it."""
    quiet = ds.utils.are_progress_bars_disabled()
    ds.disable_progress_bars()
    try:
        yield
    finally:
        if not quiet:
            ds.enable_progress_bars()


def _load_dataset(source: Path, what: str, split: str | None, **kwargs: Any) -> Rows:
    """Rows via `datasets.load_dataset`, prepared in a throwaway cache (the user's HF cache is
    left alone) and held in memory."""
    ds = _need_datasets(source, what)
    with tempfile.TemporaryDirectory(prefix="ssrengine-data-") as cache, _quiet(ds):
        try:
            loaded = ds.load_dataset(**kwargs, cache_dir=cache, keep_in_memory=True)
        except Exception as e:  # any failure of the reader is a file it cannot read
            raise InputError(f"cannot read it: {_first_line(e)}", file=str(source)) from None
        table = _pick_split(source, dict(loaded), split)
        rows = list(enumerate(table.to_list(), 1))
    yield from rows


def _saved_rows(path: Path, split: str | None) -> Rows:
    ds = _need_datasets(path, "a save_to_disk directory")
    with _quiet(ds):
        try:
            loaded = ds.load_from_disk(str(path), keep_in_memory=True)
        except Exception as e:  # as above
            raise InputError(f"cannot read it: {_first_line(e)}", file=str(path)) from None
    table = _pick_split(path, dict(loaded), split) if isinstance(loaded, ds.DatasetDict) else loaded
    yield from enumerate(table.to_list(), 1)


def read_rows(path: str | Path, split: str | None = None, *, max_line_bytes: int = 0) -> Rows:
    """``(row number, object)`` for every record of a data file or dataset directory.

    ``split``: which split of a multi-split source (None: its only split, else ``train``);
    single files have one split and ignore it. ``max_line_bytes`` (data.max_record_bytes; 0 =
    none): a longer JSONL line stops the read there, before it is parsed."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_rows(path, split)
        return _load_dataset(path, "a dataset directory", split, path=str(path))
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    suffix = _suffix(path)
    if suffix in _TEXT_SUFFIXES and path.suffix.lower() != ".gz" and _is_gzip(path):
        raise InputError(f"gzip-compressed; name it {path.name}.gz", file=str(path))
    if suffix in JSONL_SUFFIXES:
        rows = iter_jsonl(path, max_line_bytes=max_line_bytes, limit=RECORD_LIMIT)
        return _decode_errors(path, rows)
    if suffix == ".json":
        return _decode_errors(path, _json_rows(path))
    if suffix in CSV_SUFFIXES:
        return _decode_errors(path, _csv_rows(path, CSV_SUFFIXES[suffix]))
    if suffix in ARROW_SUFFIXES:
        builder = ARROW_SUFFIXES[suffix]
        return _load_dataset(
            path, f"{suffix} files", "train", path=builder, data_files={"train": str(path)}
        )
    known = [*JSONL_SUFFIXES, ".json", *CSV_SUFFIXES, *ARROW_SUFFIXES]
    raise InputError(
        f"unknown data format {suffix or '(no extension)'!r}; expected one of "
        f"{', '.join(known)} (optionally .gz), a save_to_disk or a Hub-style dataset directory",
        file=str(path),
    )
