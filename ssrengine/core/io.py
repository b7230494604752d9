"""Run-directory file primitives: append-only JSONL row files and atomic whole-file writes.

Row files are keyed by ``id``: a stage appends each finished row and flushes, so a killed
stage resumes by skipping ids already present. A torn last line (killed mid-write) is cut off
on reopen. Whole files go to a temp name and are renamed, so a half-written file never exists
under its final name.

JSONL is split on ``\\n`` only: JSON text escapes every control character, but ``json.dumps(...,
ensure_ascii=False)`` writes U+2028, U+2029 and U+0085 raw, and ``str.splitlines()`` (and a
text-mode file with universal newlines, for ``\\r``) would split a row there. Bytes are decoded
as strict UTF-8; a bad byte is an InputError naming the file, line and byte offset.

A run directory may be shared storage that someone else can write: files are never written
through a symbolic link (``O_NOFOLLOW``; temp files are created with ``O_EXCL``), and a link
where a file should be is one line naming it. Numbers are written as strict JSON: a row with a
NaN or infinity is refused (`RowWriter`), whole files write ``null`` where a value is
undefined (`finite_or_null`), so ``jq`` and other strict readers read every file.
"""

from __future__ import annotations

import errno
import glob
import gzip
import itertools
import json
import math
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


def open_nofollow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (its last component): a link
    planted in a run directory must not redirect a write to another file."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise


def symlink_error(path: str | Path) -> InputError:
    return InputError(
        "is a symbolic link; files in a run directory are not written through links: remove it "
        "(or use another run.dir)",
        file=str(path),
    )


def open_append(path: str | Path) -> Any:
    """A text file appended to (created if missing), never through a symbolic link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``: undefined), so
    it serializes as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of ``obj``: an undefined (non-finite) number becomes ``null``."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


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
        fd = _create_temp(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # A symbolic link at ``path`` is replaced by the file, never written through.
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _space_error(path, len(data), e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp(tmp: Path) -> int:
    """A new temp file, created exclusively: anything already at its name (our own leftover, or
    a file or link someone planted) is removed first, never written through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        return open_nofollow(tmp, flags)
    except FileExistsError:
        tmp.unlink()  # a link is removed, not its target
        return open_nofollow(tmp, flags)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented strict JSON (``null`` where a number is undefined), atomically."""
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows as strict JSON lines (``null`` where a number is undefined), atomically."""
    atomic_write_text(path, "".join(json_text(r, ensure_ascii=False) + "\n" for r in rows))


def _lines(data: bytes, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of ``data``, split on b"\\n" only, decoded strictly."""
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        yield lineno, decode_utf8(raw, path, offset=offset, line=lineno)
        offset += len(raw) + 1


def iter_jsonl(
    path: str | Path, *, max_line_bytes: int = 0, limit: str = ""
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a .jsonl (or gzipped .jsonl.gz)
    file; a bad line raises InputError. ``max_line_bytes`` (0 = none): a longer line is an
    InputError naming ``limit`` (the config key) as soon as that many bytes are read, before it
    is parsed, so a huge line costs neither the memory nor the time of the whole of it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    try:
        # binary lines end at b"\n" only (never at U+2028 and friends)
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=str(path)) from None
    with f:
        lines = _bounded_lines(f, path, max_line_bytes, limit) if max_line_bytes else f
        yield from _objects(lines, path)


def _bounded_lines(f: Any, path: Path, max_bytes: int, limit: str) -> Iterator[bytes]:
    for lineno in itertools.count(1):
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) > max_bytes and not (len(raw) == max_bytes + 1 and raw.endswith(b"\n")):
            raise InputError(
                f"line longer than {limit or 'the limit'}={max_bytes} bytes; not read further "
                f"(raise {limit or 'the limit'} if it is meant to be this long)",
                file=str(path),
                line=lineno,
            )
        yield raw


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
    """Append-only JSONL keyed by ``key(row)`` (default: the id); ``rows`` holds rows by key.

    The file is opened once, without following a symbolic link, and read, cut and appended
    through that one descriptor. A row holding a NaN or infinity is refused, not written."""

    def __init__(
        self, path: str | Path, key: Callable[[dict[str, Any]], str] = lambda r: r["id"]
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict[str, Any]] = {}
        try:
            self._fd = open_nofollow(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as e:
            if e.errno in DISK_FULL_ERRNOS:
                raise _space_error(self.path, None, e) from None
            raise InputError(f"cannot open: {e.strerror}", file=str(self.path)) from None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        size = os.fstat(self._fd).st_size
        chunks, at = [], 0
        while at < size:  # one pread returns at most ~2 GiB on Linux
            chunk = os.pread(self._fd, min(size - at, 1 << 30), at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
        data = b"".join(chunks)
        keep = data.rfind(b"\n") + 1  # a line without its newline was torn by a kill
        if keep < len(data):
            os.ftruncate(self._fd, keep)
        for row in _parse_rows(data[:keep], self.path):
            self.rows[self.key(row)] = row

    def write(self, row: dict[str, Any]) -> None:
        k = self.key(row)
        if k in self.rows:
            raise ValueError(f"{self.path}: row {k!r} written twice")
        try:
            text = json.dumps(row, ensure_ascii=False, allow_nan=False)
        except ValueError:
            bad = [f for f, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            raise InputError(
                f"not a finite number ({row[bad[0]]!r} in row {k!r}); not written"
                if bad
                else f"row {k!r} holds a number that is not finite; not written",
                file=str(self.path),
                field=bad[0] if bad else None,
            ) from None
        data = (text + "\n").encode("utf-8")
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
