"""Per-token loss weights: by target source and on the first target tokens (the decision).

A rehearsal target comes from the model itself (``self``), a paraphrase, the gold-decision
prefix tier (``prefix``) or the gold answer (``gold``); ``train.loss_weight_<source>`` scales
every supervised token of such a target. ``train.decision_tokens = k`` multiplies the first k
target tokens of every example by ``train.decision_weight``: in content-grounded QA they carry
the decision to answer or to decline ("The documents do not ..."), which a long answer would
otherwise outweigh. ``train.loss_per_example`` divides each example's weights by its number of
target tokens: a long own answer then counts as much as a terse gold one.

Gold targets can weigh by class: ``train.loss_weight_gold_answerable`` and
``train.loss_weight_gold_unanswerable`` multiply ``train.loss_weight_gold``, and
``train.gold_balance = "sft"`` multiplies answerable gold targets by n_answerable /
n_answerable_gold over the whole rehearsal set (`gold_balance_factor`): under SSR most answerable
examples train on own answers the model already produces (near-zero loss), so the few answerable
gold targets are what teaches "answer"; the factor gives them the weight all answerable examples
carry under SFT, where the refusals would otherwise dominate the decision.

Normalization stays exact: the step loss is sum(w·ce) / sum(w) over the supervised tokens of
the whole step (all micro-batches, all ranks), so weights that are all equal give exactly the
unweighted loss, and any packing or split of the same examples gives the same gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from ssrengine.core.config import TrainConfig
from ssrengine.core.rundir import SOURCES
from ssrengine.data.records import IGNORE_INDEX


def source_weight(
    train: TrainConfig, source: str, answerable: bool | None = None, balance: float = 1.0
) -> float:
    """``train.loss_weight_<source>``, sources without a key of their own weighing 1; for gold
    targets times the class multiplier of ``answerable`` (None: unlabelled, 1) and, for
    answerable ones, the `gold_balance_factor` ``balance``."""
    w = float(getattr(train, f"loss_weight_{source}", 1.0))
    if source != "gold" or answerable is None:
        return w
    if answerable:
        return w * train.loss_weight_gold_answerable * balance
    return w * train.loss_weight_gold_unanswerable


def gold_balance_factor(
    sources: Sequence[str], answerable: Sequence[bool | None], train: TrainConfig
) -> float:
    """train.gold_balance = "sft": n_answerable / n_answerable_gold over the whole rehearsal set
    (1 when off, or without answerable gold targets)."""
    if train.gold_balance == "off":
        return 1.0
    n_ans = sum(a is True for a in answerable)
    n_gold = sum(a is True and s == "gold" for s, a in zip(sources, answerable, strict=True))
    return n_ans / n_gold if n_gold else 1.0


def weighted(train: TrainConfig) -> bool:
    """Whether any token can weigh other than 1 (else batches carry no weights at all).
    The config checked every weight is >= 0."""
    if train.loss_per_example or train.gold_balance != "off":
        return True
    gold_classes = (train.loss_weight_gold_answerable, train.loss_weight_gold_unanswerable)
    return (
        any(source_weight(train, s) != 1.0 for s in SOURCES)
        or any(w != 1.0 for w in gold_classes)
        or (train.decision_tokens > 0 and train.decision_weight != 1.0)
    )


def example_weights(
    labels: Sequence[int],
    source: str,
    train: TrainConfig,
    answerable: bool | None = None,
    balance: float = 1.0,
) -> list[float]:
    """Weights aligned with unshifted ``labels`` (as `ssrengine.data.records.encode` returns them):
    0 on prompt tokens, the source weight (`source_weight`) on target tokens, times
    ``decision_weight`` on the first ``decision_tokens`` of them; with ``loss_per_example``
    divided by the number of target tokens."""
    w, k = source_weight(train, source, answerable, balance), 0
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
