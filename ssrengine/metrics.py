"""Pure evaluation metrics: task metrics of one split and the flat retention numbers.

An answer is "declined" when `judge.is_refusal` fires; the gold class comes from
`judge.gold_declines`. The answerable/unanswerable confusion matrix, the precision/recall/F1 of
unanswerable detection (positive class = unanswerable, predicted by declining), and the token
recall/F1 of answers to answerable questions (a declined answer scores 0). The task score is the
mean of unanswerable F1 and answer token recall, in points (0–100). Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssrengine.data import Example
from ssrengine.judge import gold_declines, is_refusal, token_f1, token_recall
from ssrengine.retention import MC_TASK
from ssrengine.rundir import Confusion, EvalDetail, SplitMetrics, UnanswerablePRF

CONFUSION_LABELS = (("answerable", "unanswerable"), ("answered", "declined"))


def confusion_matrix(unanswerable: Sequence[bool], declined: Sequence[bool]) -> list[list[int]]:
    """[[answerable & answered, answerable & declined], [unanswerable & answered, unanswerable &
    declined]]: rows are the gold class, columns the model's behaviour."""
    m = [[0, 0], [0, 0]]
    for u, d in zip(unanswerable, declined, strict=True):
        m[int(u)][int(d)] += 1
    return m


def unanswerable_prf(m: list[list[int]]) -> UnanswerablePRF:
    """Precision/recall/F1 of detecting unanswerable questions (declining = predicting
    "unanswerable"), plus the accuracy of the two-way classification."""
    tp, fn, fp, tn = m[1][1], m[1][0], m[0][1], m[0][0]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    n = tp + fn + fp + tn
    return UnanswerablePRF(
        precision=p,
        recall=r,
        f1=2 * p * r / (p + r) if p + r else 0.0,
        accuracy=(tp + tn) / n if n else 0.0,
        support=tp + fn,
    )


def detail(e: Example, answer: str) -> EvalDetail:
    unans, declined = gold_declines(e), is_refusal(answer)
    if unans:
        return EvalDetail(e.id, unans, declined)
    recall = 0.0 if declined else token_recall(answer, e.response)
    f1 = 0.0 if declined else token_f1(answer, e.response)
    return EvalDetail(e.id, unans, declined, recall, f1)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def task_metrics(
    examples: Sequence[Example], responses: dict[str, str]
) -> tuple[SplitMetrics, list[EvalDetail]]:
    """All task metrics of one split, and per-example details (eval/<split>_details.jsonl)."""
    details = [detail(e, responses[e.id]) for e in examples]
    m = confusion_matrix([d.unanswerable for d in details], [d.declined for d in details])
    answerable = [d for d in details if not d.unanswerable]
    prf = unanswerable_prf(m)
    recall = _mean([d.recall or 0.0 for d in answerable])
    metrics = SplitMetrics(
        n=len(details),
        n_answerable=len(answerable),
        confusion=Confusion(list(CONFUSION_LABELS[0]), list(CONFUSION_LABELS[1]), m),
        unanswerable=prf,
        answer_recall=recall,
        answer_f1=_mean([d.f1 or 0.0 for d in answerable]),
        score=100 * (prf.f1 + recall) / 2,
    )
    return metrics, details


def retention_metrics(retention: dict[str, Any]) -> dict[str, float]:
    """The flat "higher is better" numbers whose relative drop vs base the report averages."""
    out = {
        "probe_acc": retention["probe"]["accuracy"],
        "mc_acc": retention["mc"]["acc"],
        "own_answer_prob": retention["own_answers"]["prob_per_token"],
    }
    for task, metrics in retention.get("lm_eval", {}).items():
        # The shipped multiple-choice set through lm-eval is a cross-check of mc_acc (the same
        # scoring): it is counted once.
        if isinstance(metrics, dict) and task != MC_TASK:
            for k, v in metrics.items():
                out[f"lm_eval:{task}/{k}"] = v
    return out
