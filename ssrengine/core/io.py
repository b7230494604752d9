"""Run-directory file primitives: append-only JSONL row files and atomic whole-file writes.

Row files are keyed by ``id``: a stage appends each finished row and flushes, so a killed
stage resumes by skipping ids already present. A torn last line (killed mid-write) is cut off
on reopen. Whole files go to a temp name and are renamed, so a half-written file never exists
under its final name.

JSONL is split on ``\\n`` only: JSON text escapes every control character, but ``json.dumps(...,
ensure_ascii=False)`` writes U+2028, U+2029 and U+0085 raw, and ``str.splitlines()`` (and a
text-mode file with universal newlines, for ``\\r``) would split a row there. Bytes are decoded
as strict UTF-8; a bad byte is an InputError naming the file, line and byte offset.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ssrengine.core.errors import DISK_FULL_ERRNOS, DiskFullError, InputError


def decode_utf8(data: bytes, path: str | Path, *, offset: int = 0, line: int | None = None) -> str:
    """``data`` as strict UTF-8. ``offset``/``line``: where ``data`` starts in the file (line
    None: count the newlines in ``data`` to find the line of a bad byte)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        if line is None:
            line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {at} ({e.reason}); "
            "save the file as UTF-8",
            file=str(path),
            line=line,
        ) from None


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError("file not found", file=str(path)) from None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=str(path)) from None


def read_text(path: str | Path) -> str:
    """A whole file as strict UTF-8 text; unreadable or non-UTF-8 is an InputError."""
    return decode_utf8(read_bytes(path), path)


def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable, non-UTF-8 or invalid JSON is an InputError."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(
            f"not valid JSON: {e.msg} (column {e.colno})", file=str(path), line=e.lineno
        ) from None


def _space_error(path: Path, needed: int | None, e: OSError) -> OSError:
    if e.errno not in DISK_FULL_ERRNOS:
        return e
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    return DiskFullError(str(path), needed=needed, free=free)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of this name left by a writer that died (its pid in the name is gone)."""
    for tmp in path.parent.glob(f"{glob.escape('.' + path.name)}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file, fsync, rename over ``path``. On failure no temp is left;
    a full disk raises DiskFullError naming the path and the bytes needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _space_error(path, len(data), e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _lines(data: bytes, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of ``data``, split on b"\\n" only, decoded strictly."""
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        yield lineno, decode_utf8(raw, path, offset=offset, line=lineno)
        offset += len(raw) + 1


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a .jsonl (or gzipped .jsonl.gz)
    file; a bad line raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    try:
        # binary lines end at b"\n" only (never at U+2028 and friends)
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=str(path)) from None
    with f:
        yield from _objects(f, path)


def _objects(lines: Iterable[bytes], path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    offset = 0
    for lineno, raw in enumerate(lines, 1):
        line = decode_utf8(raw, path, offset=offset, line=lineno)
        offset += len(raw)
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
    for lineno, line in _lines(data, path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise InputError(
                "corrupt row in a stage output (not a JSON object); delete the file to redo this stage",
                file=str(path),
                line=lineno,
            )
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a stage file, in order, ignoring a torn last line (the writer cuts it on reopen)."""
    path = Path(path)
    data = read_bytes(path)
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        data = read_bytes(self.path)
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
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        try:
            while view:  # unbuffered: once this returns, the row is in the file
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            # A partial line may be on disk: the next open cuts it (no newline), as after a kill.
            raise _space_error(self.path, len(data), e) from None
        self.rows[k] = row

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
