"""Validation data for the loss during training: data.eval_file, or a held-out share of the
rehearsal set (data.eval_fraction).

data.eval_file holds records like data.train_file; their gold answers are the targets. With
data.eval_fraction a row is held out when a hash of its id falls below the fraction, so the
same rows are held out on every run and resume, whatever the row order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import RehearsalRow
from ssrengine.training import distributed
from ssrengine.training.batching import MicroBatch, encode_rows, micro_batches
from ssrengine.training.state import Trainer

log = logging.getLogger(__name__)
BEST = "best"  # checkpoints/best: train.keep_best


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
    from ssrengine.data.builtin import resolve_data_file
    from ssrengine.data.records import load_examples

    path = resolve_data_file(cfg.data.eval_file, cfg.data.seed)
    examples = load_examples(
        path,
        split=cfg.data.eval_split,
        on_invalid=cfg.data.on_invalid,
        columns=cfg.data.columns,
        max_record_bytes=cfg.data.max_record_bytes,
    )
    return [RehearsalRow.of(e) for e in examples]


def batches(cfg: Config, rows: list[RehearsalRow], tokenizer: Any) -> list[MicroBatch]:
    """The validation micro-batches, cut as training cuts an epoch (data.on_overlong applies)."""
    if not rows:
        return []
    where = cfg.data.eval_file or "rehearsal.jsonl (data.eval_fraction)"
    encoded = encode_rows(rows, tokenizer, cfg.data, file=where)
    if not encoded:
        raise InputError("no validation example fits data.max_seq_len", file=where)
    return micro_batches(encoded, cfg.train, epoch=0, pad_id=tokenizer.pad_token_id)


def loss(tr: Trainer) -> float | None:
    """The training loss (the same fused cross-entropy, per supervised token or unit of loss
    weight) over the validation batches, without gradients; None without validation data.
    Every rank evaluates all batches: the same forward passes on every rank, as FSDP2's
    collectives need, and the same result."""
    if not tr.eval_batches:
        return None
    device = tr.world.device
    total, n = torch.zeros((), device=device), 0.0
    tr.net.eval()
    try:
        with torch.no_grad():
            for mb in tr.eval_batches:
                ctx = torch.autocast(device.type, dtype=tr.autocast) if tr.autocast else None
                with ctx or nullcontext():
                    total += tr.net(mb).float()
                n += mb.normalizer
    finally:
        tr.net.train()
    return total.item() / n if n > 0 else 0.0


def at_step(tr: Trainer) -> float | None:
    """The validation loss at the steps train.eval_every names and the last, else None."""
    t = tr.cfg.train
    due = tr.step == t.max_steps or (t.eval_every and tr.step % t.eval_every == 0)
    value = loss(tr) if due else None
    if value is not None:
        log.info("step %d: validation loss %.4f", tr.step, value)
    return value


def keep_best(tr: Trainer, eval_loss: float | None, saved: Path | None) -> bool:
    """train.keep_best: a new lowest validation loss makes this step checkpoints/best (saved
    now unless ``saved`` is this step's checkpoint). Collective. Hard links: pruning step-N
    leaves checkpoints/best whole. True when it saved step-N itself."""
    if not tr.cfg.train.keep_best or eval_loss is None:
        return False
    best = tr.ckpt_root / BEST
    state = best / "trainer_state.json"
    if state.is_file() and json.loads(state.read_text()).get("eval_loss", math.inf) <= eval_loss:
        return False
    wrote = saved is None or saved.name != f"step-{tr.step}"
    if wrote:
        saved = tr.save(eval_loss=eval_loss)
    if tr.world.is_main:
        tmp = tr.ckpt_root / f".{BEST}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp, copy_function=os.link)
        meta = json.loads((tmp / "trainer_state.json").read_text())
        (tmp / "trainer_state.json").unlink()  # a link: step-N's own file stays as it is
        meta["eval_loss"] = eval_loss
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)
        log.info("new best validation loss %.4f: %s -> %s", eval_loss, saved.name, best)
    distributed.barrier()
    return wrote
