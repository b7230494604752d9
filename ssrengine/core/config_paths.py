"""Relative paths in a config file resolve from the file's folder, not the working directory:
``train_file = "data/train.jsonl"`` in ``project/configs/x.toml`` is
``project/configs/data/train.jsonl`` whatever directory the command runs in. Command-line
values stay relative to the working directory, as a shell user expects; so does run.dir, the
output, in a file too (the shipped configs write ``runs/NAME`` beside the checkout)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys that always name a file or directory (a `builtin:SPLIT` data file excepted).
FILE_KEYS = ("data.train_file", "data.eval_file", "judge.rubric", "train.lora_config_file")
# Keys that name a file or directory, or hold a name or text: a path only where it exists.
MAYBE_PATH_KEYS = ("model.path", "model.chat_template", "judge.refusal_patterns")


def _relative(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(value.strip())
        and "\n" not in value
        and not value.startswith("builtin:")
        and not Path(value).is_absolute()
    )


def resolve_relative_paths(raw: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """``raw`` (a config file's sections) with its relative paths resolved from the file's
    folder. A FILE_KEYS path found only from the working directory, as earlier versions read
    it, is kept with a warning saying how to write it."""
    folder = config_file.resolve().parent
    out = {sec: dict(v) if isinstance(v, dict) else v for sec, v in raw.items()}
    for key in (*FILE_KEYS, *MAYBE_PATH_KEYS):
        sec, _, name = key.partition(".")
        values = out.get(sec)
        if not isinstance(values, dict) or not _relative(values.get(name)):
            continue
        value = values[name]
        there = folder / value
        if there.exists():
            values[name] = str(there)
        elif key in FILE_KEYS:
            if Path(value).exists():
                log.warning(
                    "%s: %s = %r is read from the working directory (%s); relative paths in a "
                    "config file resolve from its folder (%s): write %r",
                    config_file,
                    key,
                    value,
                    Path(value).resolve(),
                    folder,
                    os.path.relpath(Path(value).resolve(), folder),
                )
            else:
                values[name] = str(there)  # the error then names where it was looked for
    return out
