"""``python -m ssrengine export RUN --format trl|hf [--out DIR]``: a run's rehearsal set for
another trainer (``trl``), or a checkpoint as a standalone HF model directory (``hf``).

``trl`` is TRL's conversational prompt-completion format (https://huggingface.co/docs/trl/dataset_formats):
``prompt`` is the list of messages the model sees — system turn with the documents, then the
dialog, exactly as generate and train render it — and ``completion`` is ``[{"role":
"assistant", "content": target}]``; ``id``, ``source`` (self|paraphrase|gold) and
``answerable`` are kept as columns. DIR (default RUN/export/trl) gets ``rehearsal.jsonl`` and,
when the optional ``datasets`` library is installed, ``dataset/`` (``Dataset.save_to_disk``;
``datasets.load_from_disk`` reads it back).

``hf`` (``[--checkpoint step-N|best]``, default the newest undamaged checkpoint) writes DIR
(default RUN/export/hf): config.json, the weights, the tokenizer and chat template, which
``from_pretrained`` and SGLang load without ssrengine. Full fine-tuning: the checkpoint's HF
files, copied. LoRA: the adapter merged into the base model (model.path of the run); the run's
final checkpoint already holds the merged model and is copied. DIR is written under a temp name
and renamed, so it exists only when complete; an existing DIR is replaced only when it is an
earlier export (it holds ``ssrengine_source.json``), else refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ssrengine.core.config_load import config_from_json
from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_jsonl, read_json
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import RehearsalRow, RunDir
from ssrengine.data.records import prompt_messages

log = logging.getLogger(__name__)

FORMATS = ("trl", "hf")


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


def export(
    run_dir: str | Path,
    fmt: str = "trl",
    out: str | Path | None = None,
    *,
    checkpoint: str | None = None,
) -> Path:
    """Write the rehearsal set (``trl``) or a checkpoint as an HF directory (``hf``; the newest
    undamaged one, or ``checkpoint``: step-N or best) of ``run_dir``; returns the output
    directory."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "hf":
        return hf_export(run_dir, checkpoint=checkpoint, out=out)
    if checkpoint is not None:
        raise InputError(
            "only with --format hf (trl exports the rehearsal set)", field="--checkpoint"
        )
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


def hf_export(
    run_dir: str | Path, *, checkpoint: str | None = None, out: str | Path | None = None
) -> Path:
    """A checkpoint of ``run_dir`` as a standalone HF directory (see the module docstring)."""
    from ssrengine.models import lora

    rd = RunDir(Path(run_dir))
    if not rd.config.is_file():
        raise InputError("not a run directory (no config.json)", file=str(rd.root))
    ckpt = _checkpoint(rd, checkpoint)
    dest = Path(out) if out is not None else rd.export("hf")
    _check_dest(dest)
    if not lora.has_hf_weights(ckpt):
        cfg = config_from_json(rd.config, warn=False)  # model.path: the base the adapter fits
        log.info("merging the LoRA adapter of %s into %s ...", ckpt, cfg.model.path)
        return lora.merge_checkpoint(ckpt, cfg, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for f in lora.hf_files(ckpt):
            shutil.copy2(f, tmp / f.name)
        source = {"checkpoint": ckpt.name, "copied": [f.name for f in lora.hf_files(ckpt)]}
        (tmp / lora.SOURCE).write_text(json.dumps(source, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _checkpoint(rd: RunDir, name: str | None) -> Path:
    """The newest undamaged checkpoint, or checkpoint ``name`` (step-N or best) if undamaged."""
    from ssrengine.training.checkpoint import (
        STEP_DIR,
        checkpoint_damage,
        list_checkpoints,
        verified_checkpoint,
    )
    from ssrengine.training.validation import BEST

    if name is None:
        ckpt = verified_checkpoint(rd.checkpoints)
        if ckpt is None:
            raise InputError(
                "no finished checkpoint; train the run first", file=str(rd.checkpoints)
            )
        return ckpt
    if not (STEP_DIR.match(name) or name == BEST):
        raise InputError(f"{name!r}: expected step-N or {BEST}", field="--checkpoint")
    ckpt = rd.checkpoints / name
    if not (ckpt / "trainer_state.json").is_file():
        there = [p.name for _, p in list_checkpoints(rd.checkpoints)]
        there += [BEST] if (rd.checkpoints / BEST / "trainer_state.json").is_file() else []
        raise InputError(
            f"no checkpoint {name} in {rd.checkpoints} (there: {', '.join(there) or 'none'})",
            field="--checkpoint",
        )
    why = checkpoint_damage(ckpt, resume=False)
    if why is not None:
        raise InputError(f"{name} is damaged: {why}", field="--checkpoint")
    return ckpt


def _check_dest(dest: Path) -> None:
    """Refuse to replace a file, or a directory that is not an earlier export."""
    from ssrengine.models.lora import SOURCE

    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest} is a file, not a directory", field="--out")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / SOURCE).is_file():
        raise InputError(
            f"{dest} holds files that are not an earlier export; name an empty or new directory",
            field="--out",
        )
