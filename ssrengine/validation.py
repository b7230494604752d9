"""Validation data for the loss during training: data.eval_file, or a held-out share of the
rehearsal set (data.eval_fraction).

data.eval_file holds records like data.train_file; their gold answers are the targets. With
data.eval_fraction a row is held out when a hash of its id falls below the fraction, so the
same rows are held out on every run and resume, whatever the row order.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ssrengine.batching import MicroBatch, encode_rows, micro_batches
from ssrengine.config import Config
from ssrengine.errors import InputError
from ssrengine.rundir import RehearsalRow


def held_out(row_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(row_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(cfg: Config, rows: list[RehearsalRow]) -> tuple[list[RehearsalRow], list[RehearsalRow]]:
    """(training rows, validation rows). Validation rows come from data.eval_file, or are
    held out of ``rows`` by data.eval_fraction; none without either."""
    d = cfg.data
    if d.eval_file:
        return rows, eval_file_rows(cfg)
    if not d.eval_fraction:
        return rows, []
    train = [r for r in rows if not held_out(r.id, d.eval_fraction)]
    held = [r for r in rows if held_out(r.id, d.eval_fraction)]
    if not held or not train:
        raise InputError(
            f"data.eval_fraction={d.eval_fraction:g} holds out {len(held)} of {len(rows)} "
            "rehearsal rows; both training and validation need at least one",
            field="data.eval_fraction",
        )
    return train, held


def eval_file_rows(cfg: Config) -> list[RehearsalRow]:
    from ssrengine.data import load_examples
    from ssrengine.datasets import resolve_data_file

    path = resolve_data_file(cfg.data.eval_file, cfg.data.seed)
    examples = load_examples(path, split=cfg.data.eval_split, on_invalid=cfg.data.on_invalid)
    return [
        RehearsalRow(
            id=e.id,
            messages=e.messages,
            documents=e.documents,
            target=e.response,
            source="gold",
            answerable=e.answerable,
        )
        for e in examples
    ]


def batches(cfg: Config, rows: list[RehearsalRow], tokenizer: Any) -> list[MicroBatch]:
    """The validation micro-batches, cut as training cuts an epoch (data.on_overlong applies)."""
    if not rows:
        return []
    where = cfg.data.eval_file or "rehearsal.jsonl (data.eval_fraction)"
    encoded = encode_rows(rows, tokenizer, cfg.data, file=where)
    if not encoded:
        raise InputError("no validation example fits data.max_seq_len", file=where)
    return micro_batches(encoded, cfg.train, epoch=0, pad_id=tokenizer.pad_token_id)
