"""Datasets: the embedded content-grounded QA generator and converters from public formats.

- `ssrengine.datasets.builtin` — a seeded generator of short documents + questions (about 30%
  unanswerable) with terse annotator-style gold answers; ``builtin:SPLIT`` in configs.
- `ssrengine.datasets.loaders` — MultiDoc2Dial, Natural Questions (simplified) and MuSiQue into
  the record format of `ssrengine.data`.
- ``python -m ssrengine.datasets`` — write either as JSONL.

Datasets build on `ssrengine.data` (the record format and its validation), never the reverse.
"""

from __future__ import annotations

from pathlib import Path

from ssrengine.datasets.builtin import SPLITS, materialize
from ssrengine.errors import InputError


def resolve_data_file(spec: str, seed: int = 0) -> Path:
    """A path, or ``builtin:SPLIT`` → the embedded generator's split, written once to the cache."""
    if not spec.startswith("builtin:"):
        return Path(spec)
    split = spec.removeprefix("builtin:")
    if split not in SPLITS:
        raise InputError(
            f"unknown builtin split {split!r}; expected one of {', '.join(SPLITS)}",
            field="data.train_file",
        )
    return materialize(split, seed)
