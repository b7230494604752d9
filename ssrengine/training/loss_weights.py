"""Per-token loss weights: by target source and on the first target tokens (the decision).

A rehearsal target comes from the model itself (``self``), a paraphrase, the gold-decision
prefix tier (``prefix``) or the gold answer (``gold``); ``train.loss_weight_<source>`` scales
every supervised token of such a target. ``train.decision_tokens = k`` multiplies the first k
target tokens of every example by ``train.decision_weight``: in content-grounded QA they carry
the decision to answer or to decline ("The documents do not ..."), which a long answer would
otherwise outweigh. ``train.loss_per_example`` divides each example's weights by its number of
target tokens: a long own answer then counts as much as a terse gold one.

Normalization stays exact: the step loss is sum(w·ce) / sum(w) over the supervised tokens of
the whole step (all micro-batches, all ranks), so weights that are all equal give exactly the
unweighted loss, and any packing or split of the same examples gives the same gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from ssrengine.core.config import TrainConfig
from ssrengine.core.rundir import SOURCES
from ssrengine.data.records import IGNORE_INDEX


def source_weight(train: TrainConfig, source: str) -> float:
    """``train.loss_weight_<source>``; sources without a key of their own weigh 1."""
    return float(getattr(train, f"loss_weight_{source}", 1.0))


def weighted(train: TrainConfig) -> bool:
    """Whether any token can weigh other than 1 (else batches carry no weights at all).
    The config checked every weight is >= 0."""
    if train.loss_per_example:
        return True
    return any(source_weight(train, s) != 1.0 for s in SOURCES) or (
        train.decision_tokens > 0 and train.decision_weight != 1.0
    )


def example_weights(labels: Sequence[int], source: str, train: TrainConfig) -> list[float]:
    """Weights aligned with unshifted ``labels`` (as `ssrengine.data.records.encode` returns them):
    0 on prompt tokens, the source weight on target tokens, times ``decision_weight`` on the
    first ``decision_tokens`` of them; with ``loss_per_example`` divided by the number of target
    tokens."""
    w, k = source_weight(train, source), 0
    if train.loss_per_example:
        w /= max(sum(lab != IGNORE_INDEX for lab in labels), 1)
    out = []
    for lab in labels:
        if lab == IGNORE_INDEX:
            out.append(0.0)
            continue
        out.append(w * (train.decision_weight if k < train.decision_tokens else 1.0))
        k += 1
    return out


def shift_weights(weights: Sequence[float]) -> list[float]:
    """The label shift of `ssrengine.models.packing.shift_labels`, applied to weights."""
    return [*weights[1:], 0.0]
