"""``python -m ssrengine export RUN --format trl [--out DIR]``: a run's rehearsal set for
another trainer.

``trl`` is TRL's conversational prompt-completion format (https://huggingface.co/docs/trl/dataset_formats):
``prompt`` is the list of messages the model sees — system turn with the documents, then the
dialog, exactly as generate and train render it — and ``completion`` is ``[{"role":
"assistant", "content": target}]``; ``id``, ``source`` (self|paraphrase|gold) and
``answerable`` are kept as columns. DIR (default RUN/export/trl) gets ``rehearsal.jsonl`` and,
when the optional ``datasets`` library is installed, ``dataset/`` (``Dataset.save_to_disk``;
``datasets.load_from_disk`` reads it back).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ssrengine.core.config_load import config_from_json
from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_jsonl, read_json
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import RehearsalRow, RunDir
from ssrengine.data.records import prompt_messages

log = logging.getLogger(__name__)

FORMATS = ("trl",)


def trl_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's rehearsal set in TRL's conversational prompt-completion format, checked to be
    what the build stage made under the run's config.json."""
    from ssrengine.pipeline import check_rehearsal

    rd = RunDir(Path(run_dir))
    if not rd.config.is_file():
        raise InputError("not a run directory (no config.json)", file=str(rd.root))
    # Export runs nothing a config names: its code settings are dropped without a word, and
    # compared as recorded (data) with what the build stage was made under.
    cfg = config_from_json(rd.config, warn=False)
    check_rehearsal(cfg, rd, settings=read_json(rd.config))
    return [
        {
            "id": r.id,
            "prompt": prompt_messages(r.messages, r.documents, cfg.data.system_prompt),
            "completion": [{"role": "assistant", "content": r.target}],
            "source": r.source,
            "answerable": r.answerable,
        }
        for r in read_typed(rd.rehearsal, RehearsalRow)
    ]


def export(run_dir: str | Path, fmt: str = "trl", out: str | Path | None = None) -> Path:
    """Write the rehearsal set of ``run_dir`` in format ``fmt``; returns the output directory."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = trl_rows(run_dir)
    dest = Path(out) if out is not None else RunDir(Path(run_dir)).export(fmt)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(dest / "rehearsal.jsonl", rows)
    try:
        import datasets
    except ImportError:
        log.info("datasets is not installed: wrote JSONL only (pip install datasets for dataset/)")
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(dest / "dataset"))
    return dest
