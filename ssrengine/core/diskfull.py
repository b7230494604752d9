"""A full disk anywhere in a command, as one line naming the path and the space it needs.

The writes of this package raise DiskFullError themselves (`ssrengine.core.io`). Writes inside
libraries do not: torch's distributed checkpoint wraps the OSError in its CheckpointException
(a BaseException; torch/distributed/checkpoint/api.py) and safetensors raises SafetensorError
"I/O error: No space left on device (os error 28)" (no errno), both without the path.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from ssrengine.core.errors import DISK_FULL_ERRNOS, DiskFullError

_MESSAGES = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f]


def _is_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    return not isinstance(e, OSError) and any(m in str(e) for m in _MESSAGES)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_full_error(exc: BaseException, run_dir: str | Path) -> DiskFullError | None:
    """``exc`` as a DiskFullError if a full disk caused it, else None.

    A checkpoint being written (``checkpoints/.step-N.tmp``, see checkpoint.save_checkpoint)
    is named and removed, as it can never be used and holds the space the user must free; the
    space it needs is the size of the newest complete checkpoint, when there is one and it is
    larger than what was written."""
    for e in _chain(exc):
        if isinstance(e, DiskFullError):
            return e
    hit = next((e for e in _chain(exc) if _is_full(e)), None)
    if hit is None:
        return None
    run_dir = Path(run_dir)
    path, needed, at_least = Path(getattr(hit, "filename", None) or run_dir), None, False
    ckpts = run_dir / "checkpoints"
    partial = sorted(ckpts.glob(".step-*.tmp"), key=lambda p: p.stat().st_mtime)
    if partial:
        path = partial[-1]
        complete = sorted(ckpts.glob("step-*"), key=lambda p: p.stat().st_mtime)
        # No complete one to measure, or one smaller than what was written before the disk
        # filled (a LoRA run's final checkpoint adds the merged model): a lower bound.
        written = _tree_size(path)
        needed = max(_tree_size(complete[-1]), written) if complete else written
        at_least = not complete or written >= needed
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
    try:
        free: int | None = shutil.disk_usage(run_dir).free
    except OSError:
        free = None
    return DiskFullError(str(path), needed=needed, free=free, at_least=at_least)
