"""Class-aware selection: answerable hard negatives kept as gold, so G is not one class.

A base model that never declines has every unanswerable example in G (gold) and most
answerable ones in R (its own answers): G is then mostly one refusal string, and "refuse" is
learned together with "this input is hard" instead of "the documents lack the answer".
``judge.gold_answerable_share = s`` turns accepted answerable examples back to gold until
answerable examples make at least the share s of G, choosing hard negatives: answerable
examples over the same documents as an unanswerable gold example first (the same context, the
other decision), then those the judge was least sure of, then a seeded draw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from ssrengine.core.errors import InputError
from ssrengine.data.records import Example
from ssrengine.rehearsal.judge import gold_declines


def _doc_key(e: Example) -> tuple[str, ...]:
    return tuple(sorted(d.get("title", "") + "\n" + d.get("text", "") for d in e.documents))


def answerable_gold(
    examples: Sequence[Example],
    sources: dict[str, str],
    scores: dict[str, float],
    share: float,
    seed: int = 0,
) -> list[str]:
    """Ids of answerable non-gold examples to train on their gold answer instead, so that
    answerable examples are at least ``share`` of the gold set. ``sources``: each example's
    current target source; ``scores``: the judge's score of its own answer (lower = less sure)."""
    if not 0.0 <= share < 1.0:
        raise InputError(f"must be in [0, 1), got {share}", field="judge.gold_answerable_share")
    gold = [e for e in examples if sources[e.id] == "gold"]
    n_unans = sum(gold_declines(e) for e in gold)
    need = math.ceil(share * n_unans / (1.0 - share) - 1e-9) - (len(gold) - n_unans)
    if share == 0.0 or need <= 0:
        return []
    unans_docs = {_doc_key(e) for e in gold if gold_declines(e)}
    rng = random.Random(seed)
    candidates = [e for e in examples if sources[e.id] != "gold" and not gold_declines(e)]
    draw = {e.id: rng.random() for e in candidates}
    candidates.sort(
        key=lambda e: (_doc_key(e) not in unans_docs, scores.get(e.id, 0.0), draw[e.id])
    )
    return [e.id for e in candidates[:need]]
