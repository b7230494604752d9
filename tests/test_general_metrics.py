"""Task metrics on data that defines only one gold class (general data: no answerability
labels, no refusals as gold answers): what it cannot define is undefined ("–"), never 0."""

from __future__ import annotations

import math

import pytest

from ssrengine.core.eval_rows import EvalDetail
from ssrengine.evaluation.comparison import _ci
from ssrengine.evaluation.metrics import paper_metrics


def _d(i: int, unans: bool, declined: bool, recall: float | None = None) -> EvalDetail:
    return EvalDetail(f"e{i}", unans, declined, recall, recall, None)


def test_all_answerable_data_has_no_unanswerable_metrics_and_no_composite():
    details = [_d(0, False, False, 1.0), _d(1, False, False, 0.5), _d(2, False, True, 0.0)]
    v = {k: x["value"] for k, x in paper_metrics(details).items()}
    for undefined in ("unanswerable_f1", "unanswerable_acc", "decline_unanswerable", "score"):
        assert math.isnan(v[undefined]), undefined
    assert v["answer_recall"] == pytest.approx(1.5 / 3)  # defined: the answers' token recall
    assert v["answerable_acc"] == pytest.approx(2 / 3)
    assert v["answerable_f1"] == pytest.approx(4 / 5)  # TP 2, FN 1
    assert _ci(paper_metrics(details)["score"], 1) == "–"  # the report's cell, not 0.0


def test_all_unanswerable_data_has_no_answerable_f1():
    v = {k: x["value"] for k, x in paper_metrics([_d(0, True, True), _d(1, True, False)]).items()}
    assert math.isnan(v["answerable_f1"]) and v["unanswerable_f1"] == pytest.approx(2 / 3)
    assert not math.isnan(v["score"])  # unanswerable F1 defines it; no answers to recall count 0
