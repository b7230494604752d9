"""Comparing runs: every run's paper metrics with 95% bootstrap intervals, and *paired*
bootstrap differences on the questions both runs answered (every run against the base, every
other run against the first SFT run); a difference whose interval excludes 0 is significant."""

from __future__ import annotations

import math
from typing import Any

from ssrengine.evaluation import stats
from ssrengine.evaluation.metrics import DECISION_AUC, PAPER_METRICS, split_stats
from ssrengine.evaluation.runs import SPLIT_LABELS, RunData

# -------------------------------------------------------------------- intervals, paired tests
METRIC_LABELS = {
    "answerable_acc": "ans. acc",
    "unanswerable_acc": "unans. acc",
    "accuracy": "acc",
    "answerable_f1": "ans. F1",
    "unanswerable_f1": "unans. F1",
    "answer_recall": "ans. recall",
    "decline_answerable": "declines ans.",
    "decline_unanswerable": "declines unans.",
    "score": "score (composite)",
    DECISION_AUC: "decision AUC",
    "probe_acc": "probe acc",
    "mc_acc": "MC acc",
    "own_answer_prob": "own-answer p/token",
}

# metrics in [0, 1] are shown in points; the composite already is; AUC stays a probability
_SCALE = {"score": 1.0, DECISION_AUC: 1.0}

# what the paired comparison tests, per split
COMPARED = (
    "answerable_acc",
    "unanswerable_acc",
    "answerable_f1",
    "unanswerable_f1",
    "answer_recall",
    DECISION_AUC,
    "score",
)


def _scaled(metric: str, v: dict[str, Any]) -> dict[str, Any]:
    k = _SCALE.get(metric, 100.0)
    return {**v, **{x: v[x] * k for x in ("value", "lo", "hi") if x in v}}


def interval_tables(runs: list[RunData], splits: list[str]) -> dict[str, Any]:
    """Per split: every run's paper metrics with 95% intervals (points; AUC as a probability);
    and every run's retention metrics with theirs. Evals without intervals are left out."""
    task: dict[str, list[dict[str, Any]]] = {}
    for s in splits:
        rows = []
        for r in runs:
            paper = r.eval.splits[s].paper
            if paper:
                rows.append({"run": r.name, **{k: _scaled(k, v) for k, v in paper.items()}})
        task[s] = rows
    retention = []
    for r in runs:
        ret = r.eval.retention
        got = {
            "probe_acc": ret.get("probe", {}).get("ci"),
            "mc_acc": ret.get("mc", {}).get("ci"),
            "own_answer_prob": ret.get("own_answers", {}).get("ci"),
        }
        if any(got.values()):
            retention.append(
                {"run": r.name, **{k: _scaled(k, v) for k, v in got.items() if v is not None}}
            )
    return {"task": task, "retention": retention}


def comparison_pairs(runs: list[RunData]) -> list[tuple[RunData, RunData]]:
    """(reference, run): every run against the base, every other run against the first SFT."""
    base = next((r for r in runs if r.mode == "base"), None)
    sft = next((r for r in runs if r.mode == "sft"), None)
    pairs = []
    for r in runs:
        if base is not None and r is not base:
            pairs.append((base, r))
        if sft is not None and r is not sft and r is not base:
            pairs.append((sft, r))
    return pairs


def _paired_items(
    a: dict[str, bool], b: dict[str, bool], seed: int
) -> dict[str, float | bool] | None:
    ids = [i for i in a if i in b]
    if not ids:
        return None
    d = stats.paired_difference(
        stats.mean_stat([a[i] for i in ids]),
        stats.mean_stat([b[i] for i in ids]),
        len(ids),
        seed=seed,
    )
    return {**_scaled("", d), "n": len(ids)}


def paired_comparison(
    a: RunData, b: RunData, splits: list[str], seed: int = stats.SEED
) -> dict[str, Any]:
    """b − a on the items both answered, with paired 95% bootstrap intervals: per split the
    `COMPARED` task metrics (questions resampled within each gold class), and probe / MC
    accuracy. Metrics without per-item files on both sides are left out."""
    out: dict[str, Any] = {"reference": a.name, "run": b.name, "splits": {}, "retention": {}}
    for s in splits:
        da = {d.id: d for d in a.details.get(s, [])}
        db = {d.id: d for d in b.details.get(s, [])}
        ids = [i for i in da if i in db and da[i].unanswerable == db[i].unanswerable]
        if not ids:
            continue
        sa, sb = split_stats([da[i] for i in ids]), split_stats([db[i] for i in ids])
        strata = [int(da[i].unanswerable) for i in ids]
        diffs: dict[str, Any] = {"n": len(ids)}
        for k in COMPARED:
            if k in sa and k in sb:
                d = stats.paired_difference(sa[k], sb[k], len(ids), strata=strata, seed=seed)
                diffs[k] = _scaled(k, d)
        out["splits"][s] = diffs
    for key, att in (("probe_acc", "probe_correct"), ("mc_acc", "mc_correct")):
        d = _paired_items(getattr(a, att), getattr(b, att), seed)
        if d is not None:
            out["retention"][key] = d
    return out


def _ci(v: dict[str, Any] | None, digits: int, *, sign: bool = False) -> str:
    if not v:
        return "–"
    if any(isinstance(v[k], float) and math.isnan(v[k]) for k in ("value", "lo", "hi")):
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = f"{f.format(v['value'])} [{v['lo']:.{digits}f}, {v['hi']:.{digits}f}]"
    return f"**{text}**" if v.get("significant") else text


def _digits(metric: str) -> int:
    return 3 if metric == DECISION_AUC else 1


def interval_markdown(tables: dict[str, Any]) -> list[str]:
    out = []
    for s, rows in tables["task"].items():
        if not rows:
            continue
        keys = [k for k in (*PAPER_METRICS, DECISION_AUC) if all(k in r for r in rows)]
        out += [f"### {SPLIT_LABELS.get(s, s)}: task metrics with 95% bootstrap intervals", ""]
        out.append("| run | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |")
        out.append("|" + "---|" * (len(keys) + 1))
        for r in rows:
            out.append(f"| {r['run']} | " + " | ".join(_ci(r[k], _digits(k)) for k in keys) + " |")
        out.append("")
    rows = tables["retention"]
    if rows:
        keys = [k for k in ("probe_acc", "mc_acc", "own_answer_prob") if all(k in r for r in rows)]
        out += ["### Retention with 95% bootstrap intervals (points)", ""]
        out.append("| run | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |")
        out.append("|" + "---|" * (len(keys) + 1))
        for r in rows:
            out.append(f"| {r['run']} | " + " | ".join(_ci(r[k], 1) for k in keys) + " |")
        out.append("")
    return out


def paired_markdown(comparisons: list[dict[str, Any]]) -> list[str]:
    """One row per (pair, split): each difference with its paired interval; significant ones
    (interval excludes 0) in bold."""
    if not comparisons:
        return []
    out = [
        "### Paired differences (run − reference, same questions; **bold** = significant)",
        "",
        "| run − reference | split | n | "
        + " | ".join(METRIC_LABELS[k] for k in COMPARED)
        + " | probe acc | MC acc |",
        "|" + "---|" * (len(COMPARED) + 5),
    ]
    for c in comparisons:
        ret = c["retention"]
        for j, (s, d) in enumerate(c["splits"].items()):
            cells = [_ci(d.get(k), _digits(k), sign=True) for k in COMPARED]
            extra = [
                _ci(ret.get(k), 1, sign=True) if j == 0 else "" for k in ("probe_acc", "mc_acc")
            ]
            out.append(
                f"| {c['run']} − {c['reference']} | {SPLIT_LABELS.get(s, s)} | {d['n']} | "
                + " | ".join(cells + extra)
                + " |"
            )
    out.append("")
    return out


def significant_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    """A sentence per pair naming its significant differences (or saying there are none)."""
    out = []
    for c in comparisons:
        sig = [
            f"{METRIC_LABELS[k]} ({SPLIT_LABELS.get(s, s)}) {d[k]['value']:+.{_digits(k)}f}"
            for s, d in c["splits"].items()
            for k in COMPARED
            if k in d and d[k]["significant"]
        ]
        sig += [
            f"{METRIC_LABELS[k]} {d['value']:+.1f}"
            for k, d in c["retention"].items()
            if d["significant"]
        ]
        head = f"- {c['run']} vs {c['reference']}: "
        out.append(
            head + ("significant: " + "; ".join(sig) + "." if sig else "no significant difference.")
        )
    return out
