"""The run directory is usable and ours alone: checked before any stage writes, then locked.

Two commands writing one run directory would both append every row (two `generate` runs write
each id twice) or tear each other's checkpoints and metrics. Every command that writes a run
directory holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for its whole life; the kernel
drops it when the process ends, however it ends, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssrengine.core.errors import InputError
from ssrengine.core.io import read_json

LOCK_FILE = ".lock"


def check_run_dir(path: str | Path) -> Path:
    """Create the run directory if needed; a path through a file, a read-only or unwritable
    directory, or a damaged saved config.json is an InputError naming it."""
    run_dir = Path(path)
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == run_dir else f"; run.dir {str(run_dir)!r} cannot be made in it"
                raise InputError(f"is a file, not a directory{where}", file=str(p), field="run.dir")
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot create the run directory: {e.strerror}", file=str(run_dir), field="run.dir"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise InputError(
            "not writable (read-only file system or no permission)",
            file=str(run_dir),
            field="run.dir",
        )
    saved = run_dir / "config.json"
    if saved.exists() and not isinstance(read_json(saved), dict):
        raise InputError("expected a JSON object of config sections", file=str(saved))
    return run_dir


@contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the ``with`` body; a second holder is refused at once
    with the first one's pid. Under torchrun only rank 0 locks (the ranks are one run)."""
    run_dir = check_run_dir(path)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    lock = run_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"cannot create the lock file: {e.strerror}", file=str(lock)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(
                f"in use by another run (pid {holder}); wait for it to finish or use another "
                "run.dir",
                file=str(run_dir),
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock
