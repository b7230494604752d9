"""Pure evaluation metrics: task metrics of one split and the flat retention numbers.

An answer is "declined" when `judge.is_refusal` fires; the gold class comes from
`judge.gold_declines`. The answerable/unanswerable confusion matrix, the precision/recall/F1 of
unanswerable detection (positive class = unanswerable, predicted by declining), and the token
recall/F1 of answers to answerable questions (a declined answer scores 0). The task score is the
mean of unanswerable F1 and answer token recall, in points (0–100): our own composite, kept as a
secondary number. `paper_metrics` gives the paper's metrics separately, each with a seeded 95%
bootstrap interval over the questions (resampled within each gold class), and the AUC of the
decision probe. Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ssrengine.core.eval_rows import Confusion, EvalDetail, SplitMetrics, UnanswerablePRF
from ssrengine.data.records import Example
from ssrengine.evaluation import stats
from ssrengine.evaluation.retention import MC_TASK
from ssrengine.rehearsal.judge import gold_declines, is_refusal, token_f1, token_recall

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
    examples: Sequence[Example],
    responses: dict[str, str],
    refusal_logprob: dict[str, float] | None = None,
    *,
    seed: int = stats.SEED,
) -> tuple[SplitMetrics, list[EvalDetail]]:
    """All task metrics of one split, and per-example details (eval/<split>_details.jsonl).
    ``refusal_logprob`` (by id): the decision probe's scores, giving ``paper["decision_auc"]``."""
    details = [detail(e, responses[e.id]) for e in examples]
    if refusal_logprob is not None:
        details = [replace(d, refusal_logprob=refusal_logprob[d.id]) for d in details]
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
        paper=paper_metrics(details, seed),
    )
    return metrics, details


# The paper's metrics, in the order the report shows them; all in [0, 1], "higher is better"
# except the decline rate on answerable questions.
PAPER_METRICS = (
    "answerable_acc",  # answerable questions answered
    "unanswerable_acc",  # unanswerable questions declined
    "accuracy",  # both classes together
    "answerable_f1",  # F1 of the answerable class (predicted by answering)
    "unanswerable_f1",  # F1 of the unanswerable class (predicted by declining)
    "answer_recall",  # token recall of answers to answerable questions (declined = 0)
    "decline_answerable",  # share of answerable questions declined
    "decline_unanswerable",  # share of unanswerable questions declined
    "score",  # the composite: (unanswerable F1 + answer recall) / 2
)
DECISION_AUC = "decision_auc"


def _f1(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-row F1 of one class: 2·TP / (2·TP + FP + FN), 0 when the class is never involved."""
    tp = (gold & pred).sum(axis=1)
    wrong = (gold ^ pred).sum(axis=1)
    den = 2 * tp + wrong
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)


def _class_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (values * mask).sum(axis=1) / n, np.nan)


def split_stats(details: Sequence[EvalDetail]) -> dict[str, stats.Stat]:
    """The paper's metrics of one split as bootstrap statistics over its questions (see
    `ssrengine.evaluation.stats`), plus the decision-probe AUC where every detail has a refusal score."""
    u = np.array([d.unanswerable for d in details], dtype=bool)
    dec = np.array([d.declined for d in details], dtype=bool)
    rec = np.array([d.recall or 0.0 for d in details], dtype=np.float64)

    # A class the data does not have leaves its metrics undefined (NaN, "–" in the report),
    # not 0: data without unanswerable questions (no answerability labels, no refusals as
    # gold) defines neither unanswerable F1 nor the composite built on it.
    has_u, has_a = bool(u.any()), bool((~u).any())

    def metric(name: str) -> stats.Stat:
        def stat(idx: np.ndarray) -> np.ndarray:
            gu, dd, rr = u[idx], dec[idx], rec[idx]
            ga = ~gu
            undefined = np.full(idx.shape[0], np.nan)
            vals = {
                "answerable_acc": lambda: _class_mean(~dd, ga),
                "unanswerable_acc": lambda: _class_mean(dd, gu),
                "accuracy": lambda: (gu == dd).mean(axis=1),
                "answerable_f1": lambda: _f1(ga, ~dd) if has_a else undefined,
                "unanswerable_f1": lambda: _f1(gu, dd) if has_u else undefined,
                "answer_recall": lambda: _class_mean(rr, ga),
                "decline_answerable": lambda: _class_mean(dd, ga),
                "decline_unanswerable": lambda: _class_mean(dd, gu),
                "score": lambda: (
                    100 * (_f1(gu, dd) + np.nan_to_num(_class_mean(rr, ga))) / 2
                    if has_u
                    else undefined
                ),
            }
            return vals[name]()

        return stat

    out = {k: metric(k) for k in PAPER_METRICS}
    if details and all(d.refusal_logprob is not None for d in details):
        # a model that knows when to decline finds the refusal likelier on unanswerable prompts
        out[DECISION_AUC] = stats.auc_stat([d.refusal_logprob or 0.0 for d in details], u)
    return out


def paper_metrics(
    details: Sequence[EvalDetail], seed: int = stats.SEED
) -> dict[str, dict[str, float]]:
    """Every `split_stats` metric as ``{value, lo, hi}``: value on all questions, 95% bootstrap
    interval resampling questions within each gold class (the class counts stay fixed)."""
    strata = [int(d.unanswerable) for d in details]
    return {
        k: stats.estimate(s, len(details), strata=strata, seed=seed)
        for k, s in split_stats(details).items()
    }


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
