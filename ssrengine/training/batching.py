"""From rehearsal rows to training micro-batches.

`encode_rows` renders every row with the chat template (loss on the target only) and applies
the over-long policy; `micro_batches` cuts one epoch into micro-batches, padded or packed.
Both kinds shift labels with `ssrengine.models.packing.shift_labels`: ``labels[t]`` is the target of
position ``t``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssrengine.core.config import DataConfig, TrainConfig
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import REHEARSAL, RehearsalRow
from ssrengine.data.records import IGNORE_INDEX, encode, prompt_messages
from ssrengine.models.packing import PackedBatch, model_inputs, pack, shift_labels
from ssrengine.training.loss_weights import (
    example_weights,
    gold_balance_factor,
    shift_weights,
    weighted,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]  # unshifted: IGNORE_INDEX on prompt tokens, the token itself on targets
    source: str = "gold"
    answerable: bool | None = None
    # train.unlikelihood_weight: (position, token): the logits at this position get the
    # unlikelihood of the refusal's token (`unlikely_target`); None = no term for this example
    unlikely: tuple[int, int] | None = None


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), shifted: labels[:, t] is the target of position t
    model_kwargs: dict[str, Any]  # attention_mask (padded) or position_ids/cu_seqlens (packed)
    supervised_tokens: int  # known on the host from the data: no device sync to normalize
    real_tokens: int
    ids: list[str]
    seq_lens: tuple[int, ...] = ()  # real tokens of each example (FLOPs: ssrengine.models.flops)
    # (B, T) per-token loss weights aligned with labels (`ssrengine.training.loss_weights`); None = all 1
    token_weights: torch.Tensor | None = None
    supervised_weight: float | None = None  # their sum, on the host; None = supervised_tokens
    # train.unlikelihood_weight: flat indices into the (B·T) positions and the refusal token
    # each one penalizes, (K,) each; None = no unlikelihood term in this micro-batch
    unlikely_positions: torch.Tensor | None = None
    unlikely_tokens: torch.Tensor | None = None

    @property
    def normalizer(self) -> float:
        """This micro-batch's share of the step's loss normalizer: the supervised weight."""
        return self.supervised_tokens if self.supervised_weight is None else self.supervised_weight


def unlikely_target(
    tokenizer: Any, messages: list[dict[str, str]], labels: list[int], refusal: str
) -> tuple[int, int] | None:
    """Where an own answer departs from ``refusal``: (the position whose logits predict that
    target token, the refusal's token there). Both are tokenized after the same prompt, so a
    shared opening ("The ...") is skipped and only the refusal's first distinguishing token is
    penalized, never a token the own answer itself trains on. None when the answer starts with
    the whole refusal."""
    target = [t for t in labels if t != IGNORE_INDEX]
    start = len(labels) - len(target)
    _, ref_labels = encode(tokenizer, messages, refusal)
    ref = [t for t in ref_labels if t != IGNORE_INDEX]
    j = next((k for k, (a, b) in enumerate(zip(target, ref)) if a != b), None)
    if j is None:
        return None
    return start + j - 1, ref[j]


def encode_rows(
    rows: Sequence[RehearsalRow],
    tokenizer: Any,
    data: DataConfig,
    *,
    file: str = REHEARSAL,
    train: TrainConfig | None = None,
) -> list[Encoded]:
    """Tokenize rehearsal rows; over-long examples follow data.on_overlong (targets are never cut).
    With ``train`` and train.unlikelihood_weight > 0, accepted own answers of answerable
    examples also get their unlikelihood target (`unlikely_target`)."""
    ul = train is not None and train.unlikelihood_weight > 0
    out, dropped, trimmed = [], 0, 0
    for lineno, r in enumerate(rows, 1):
        docs = list(r.documents)
        while True:
            msgs = prompt_messages(r.messages, docs, data.system_prompt)
            ids, labels = encode(tokenizer, msgs, r.target)
            if len(ids) <= data.max_seq_len or data.on_overlong == "error":
                break
            if data.on_overlong == "trim_documents" and docs:
                docs.pop()  # the last document goes first; the target is never touched
                continue
            break
        if len(ids) > data.max_seq_len:
            if data.on_overlong == "error":
                raise InputError(
                    f"example {r.id!r} is {len(ids)} tokens, longer than data.max_seq_len={data.max_seq_len} "
                    "(set data.on_overlong = trim_documents or skip, or raise data.max_seq_len)",
                    file=file,
                    line=lineno,
                    field="documents" if docs else "messages",
                )
            dropped += 1
            continue
        trimmed += len(docs) < len(r.documents)
        unlikely = None
        if ul and r.source == "self" and r.answerable:
            unlikely = unlikely_target(tokenizer, msgs, labels, train.unlikelihood_text)
        out.append(Encoded(r.id, ids, labels, r.source, r.answerable, unlikely))
    if trimmed:
        log.warning(
            "trimmed documents of %d over-long example(s) to fit data.max_seq_len=%d",
            trimmed,
            data.max_seq_len,
        )
    if dropped:
        log.warning(
            "dropped %d over-long example(s) (data.on_overlong = %s)", dropped, data.on_overlong
        )
    if not out:
        raise InputError("no training example fits data.max_seq_len", file=file)
    return out


def _weights(
    items: Sequence[Encoded], train: TrainConfig | None, balance: float = 1.0
) -> list[list[float]] | None:
    """Shifted per-token weights of each item, or None when the config weighs every token 1.
    ``balance``: the whole set's `gold_balance_factor`."""
    if train is None or not weighted(train):
        return None
    return [
        shift_weights(example_weights(e.labels, e.source, train, e.answerable, balance))
        for e in items
    ]


def _with_unlikely(mb: MicroBatch, flat: list[tuple[int, int]]) -> MicroBatch:
    """``flat``: (index into the flattened (B·T) positions, refusal token) per example."""
    if flat:
        mb.unlikely_positions = torch.tensor([p for p, _ in flat], dtype=torch.long)
        mb.unlikely_tokens = torch.tensor([t for _, t in flat], dtype=torch.long)
    return mb


def _with_weights(mb: MicroBatch, rows: list[list[float]] | None) -> MicroBatch:
    if rows is None:
        return mb
    w = torch.zeros(mb.labels.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        w[i, : len(r)] = torch.tensor(r)
    mb.token_weights = w
    mb.supervised_weight = float(sum(map(sum, rows)))
    return mb


def padded_batch(
    items: list[Encoded], pad_id: int, train: TrainConfig | None = None, balance: float = 1.0
) -> MicroBatch:
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(shift_labels(e.labels))
        mask[i, :n] = 1
    mb = MicroBatch(
        input_ids=ids,
        labels=labels,
        model_kwargs={"attention_mask": mask},
        supervised_tokens=int((labels != IGNORE_INDEX).sum()),
        real_tokens=int(mask.sum()),
        ids=[e.id for e in items],
        seq_lens=tuple(len(e.input_ids) for e in items),
    )
    flat = [(i * width + e.unlikely[0], e.unlikely[1]) for i, e in enumerate(items) if e.unlikely]
    return _with_unlikely(_with_weights(mb, _weights(items, train, balance)), flat)


def packed_micro_batch(
    batch: PackedBatch,
    weights: dict[str, list[float]] | None = None,
    unlikely: dict[str, tuple[int, int]] | None = None,
) -> MicroBatch:
    """One packed row (1, T): position_ids + varlen boundaries, right for any attention impl.
    ``weights``: shifted token weights by example id, concatenated in packed order;
    ``unlikely``: each example's unlikelihood target (position within the example, token)."""
    kwargs = model_inputs(batch, None)
    mb = MicroBatch(
        input_ids=kwargs.pop("input_ids"),
        labels=batch.labels[None],  # shifted within each example by pack()
        model_kwargs=kwargs,
        supervised_tokens=batch.num_targets,
        real_tokens=batch.num_tokens,
        ids=batch.ids,
        seq_lens=tuple(b - a for a, b in itertools.pairwise(batch.bounds)),
    )
    if unlikely:
        starts = dict(zip(batch.ids, batch.bounds, strict=False))
        _with_unlikely(
            mb, [(starts[i] + unlikely[i][0], unlikely[i][1]) for i in batch.ids if i in unlikely]
        )
    if weights is None:
        return mb
    return _with_weights(mb, [[w for i in batch.ids for w in weights[i]]])


def micro_batches(
    encoded: list[Encoded], train: TrainConfig, *, epoch: int, pad_id: int
) -> list[MicroBatch]:
    """One epoch of micro-batches in a seeded order (seed, epoch): resumable by index alone.

    train.packing: best-fit-decreasing bins of train.max_tokens (the shuffle decides only which
    equal-length examples share a bin), in a seeded bin order; else padded micro_batch_size."""
    balance = gold_balance_factor(
        [e.source for e in encoded], [e.answerable for e in encoded], train
    )
    rng = random.Random(train.seed * 1_000_003 + epoch)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    items = [encoded[i] for i in order]
    if train.packing:
        bins = pack(
            [(e.input_ids, e.labels) for e in items], train.max_tokens, ids=[e.id for e in items]
        )
        rng.shuffle(bins)
        w = _weights(items, train, balance)
        by_id = None if w is None else {e.id: x for e, x in zip(items, w)}
        unlikely = {e.id: e.unlikely for e in items if e.unlikely}
        return [packed_micro_batch(b, by_id, unlikely) for b in bins]
    bs = train.micro_batch_size
    return [
        padded_batch(items[i : i + bs], pad_id, train, balance) for i in range(0, len(items), bs)
    ]
