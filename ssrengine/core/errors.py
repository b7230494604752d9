"""Error types that end a command with one line: bad input, a full disk, a stop signal."""

from __future__ import annotations

import errno
import signal

# The errnos of a full disk: no space, or the user's quota spent.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Stopped(KeyboardInterrupt):
    """A signal stopped the run between steps (after saving what a rerun resumes from), or a
    second one at once. The command exits 128 + ``signum`` (130 for SIGINT, 143 for SIGTERM),
    the status a shell reports for a process that signal ended."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class InputError(ValueError):
    """Bad user input: a file, line, field or argument that cannot be used.

    The CLI prints it as one line (``error: FILE:LINE: field 'x': message``) and exits 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message, self.file, self.line, self.field = message, file, line, field
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}")


class DiskFullError(InputError):
    """A write failed for lack of space (ENOSPC/EDQUOT). Reported like bad input, one line and
    exit 2, because the user must act (free space) and a rerun resumes where the write failed."""

    def __init__(
        self,
        path: str,
        *,
        needed: int | None = None,
        free: int | None = None,
        at_least: bool = False,
    ) -> None:
        more = "more than " if at_least else ""
        need = f"needs {more}{_size(needed)}, " if needed is not None else ""
        have = f"{_size(free)} free" if free is not None else "no space left"
        super().__init__(
            f"disk full: writing this {need}{have} on its filesystem; "
            "free space and rerun the same command to resume",
            file=path,
        )


def _size(n: int) -> str:
    units, x, i = ("bytes", "KiB", "MiB", "GiB", "TiB"), float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x, i = x / 1024, i + 1
    return f"{n} bytes" if i == 0 else f"{x:.1f} {units[i]}"
