"""Run-directory file primitives: append-only JSONL row files and atomic whole-file writes.

Row files are keyed by ``id``: a stage appends each finished row and flushes, so a killed
stage resumes by skipping ids already present. A torn last line (killed mid-write) is cut off
on reopen. Whole files go to a temp name and are renamed, so a half-written file never exists
under its final name.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ssrengine.errors import InputError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a .jsonl (or gzipped .jsonl.gz)
    file; a bad line raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"malformed JSON: {e.msg} (column {e.colno})", file=str(path), line=lineno
                ) from None
            if not isinstance(obj, dict):
                raise InputError("each line must be a JSON object", file=str(path), line=lineno)
            yield lineno, obj


def _parse_rows(data: bytes, path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise InputError(
                "corrupt row in a stage output; delete the file to redo this stage",
                file=str(path),
                line=lineno,
            ) from None
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a stage file, in order, ignoring a torn last line (the writer cuts it on reopen)."""
    path = Path(path)
    data = path.read_bytes()
    return _parse_rows(data[: data.rfind(b"\n") + 1], path)


class RowWriter:
    """Append-only JSONL keyed by ``key(row)`` (default: the id); ``rows`` holds rows by key."""

    def __init__(
        self, path: str | Path, key: Callable[[dict[str, Any]], str] = lambda r: r["id"]
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._recover()
        self._f = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # a line without its newline was torn by a kill
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        for row in _parse_rows(data[:keep], self.path):
            self.rows[self.key(row)] = row

    def write(self, row: dict[str, Any]) -> None:
        k = self.key(row)
        if k in self.rows:
            raise ValueError(f"{self.path}: row {k!r} written twice")
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.rows[k] = row

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
