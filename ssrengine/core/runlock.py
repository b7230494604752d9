"""The run directory is usable and ours alone: checked before any stage writes, then locked.

Two commands writing one run directory would both append every row (two `generate` runs write
each id twice) or tear each other's checkpoints and metrics. Every command that writes a run
directory holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for its whole life; the kernel
drops it when the process ends, however it ends, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssrengine.core.errors import InputError
from ssrengine.core.io import open_nofollow, read_json, symlink_error
from ssrengine.core.rundir import CONFIG, EVAL

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
    for f in _linked_files(run_dir):
        raise symlink_error(f)  # refused before any stage writes (the writers refuse it too)
    saved = run_dir / CONFIG
    if saved.exists() and not isinstance(read_json(saved), dict):
        raise InputError("expected a JSON object of config sections", file=str(saved))
    return run_dir


def _linked_files(run_dir: Path) -> list[Path]:
    """Symbolic links where the run directory (or its eval/) keeps a file: its JSON and JSONL
    files and the lock. Linked directories (checkpoints/ on another disk) are fine."""
    found = []
    for d in (run_dir, run_dir / EVAL):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_symlink() and (p.name == LOCK_FILE or p.suffix in (".json", ".jsonl")):
                found.append(p)
    return sorted(found)


@contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the ``with`` body; a second holder is refused at once
    with the first one's pid. Under torchrun only rank 0 locks (the ranks are one run).

    The lock file is never opened through a symbolic link (a planted link would get another
    file overwritten with our pid). A command refused with an InputError leaves the run
    directory as it found it: the lock file's old content is put back, and a lock file (and an
    empty run directory) this command created is removed."""
    existed = Path(path).exists()
    run_dir = check_run_dir(path)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    lock = run_dir / LOCK_FILE
    fd, created = _open_locked(lock, run_dir)
    try:
        old = os.pread(fd, 4096, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield run_dir
        except InputError:
            if created:
                lock.unlink(missing_ok=True)  # still locked: a racing opener sees a new inode
                if not existed:
                    with contextlib.suppress(OSError):
                        run_dir.rmdir()  # only if empty
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, old, 0)
            raise
    finally:
        os.close(fd)  # releases the lock


def _open_locked(lock: Path, run_dir: Path) -> tuple[int, bool]:
    """The lock file's descriptor, exclusively flocked, and whether this call created the file.
    Refuses a held lock, a symbolic link and anything but a regular file in one line each."""
    for _ in range(3):
        created = True
        try:
            fd = open_nofollow(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            created = False
            try:
                fd = open_nofollow(lock, os.O_RDWR)
            except FileNotFoundError:
                continue  # removed between the two opens (a refused command cleaning up)
            except OSError as e:
                raise InputError(
                    f"cannot open the lock file: {e.strerror}", file=str(lock)
                ) from None
        except OSError as e:
            raise InputError(f"cannot create the lock file: {e.strerror}", file=str(lock)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError("not a regular file; remove it", file=str(lock))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise InputError(
                    f"in use by another run (pid {holder}); wait for it to finish or use another "
                    "run.dir",
                    file=str(run_dir),
                ) from None
            if _same_file(fd, lock):
                return fd, created
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file a refused command had just removed: open the new one
    raise InputError(
        f"in use by another run (its lock file keeps changing: {lock})", file=str(run_dir)
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
