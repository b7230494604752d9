"""``python -m ssrengine report RUN...``: one table across evaluated runs, plots, markdown/HTML.

Each RUN is a directory with eval/eval.json (`python -m ssrengine eval`); metrics.jsonl and
build_stats.json are used where present. The base is the run evaluated as a model (mode
"base") or --base. Per retention metric the relative drop vs base is 100 * (base - run) / base;
"avg drop" is its mean over the metrics every compared run has, own-answer p/token left out
(it favours SSR by construction): the paper's headline number.

Task metrics are the paper's, separately (answerable/unanswerable accuracy and F1, token recall
on answerable questions, decline rates, the decision probe's AUC), each with its 95% bootstrap
interval from eval.json; the composite score is a secondary column. Runs are compared with
*paired* bootstrap intervals on the questions (probe prompts, MC items) both runs answered, read
from the per-item files of eval/: every run against the base, and every other run against the
first SFT run; a difference whose interval excludes 0 is marked significant.

Outputs in --out: report.md (PNG links), report.html (self-contained, images inlined),
summary.json, and the plots: rg_share.png, loss_curves.png, logprob_hist.png (paper Figure 1),
confusion.png (Figure 3), retention.png.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_text
from ssrengine.evaluation.comparison import (
    comparison_pairs,
    interval_markdown,
    interval_tables,
    paired_comparison,
    paired_markdown,
    significant_lines,
)
from ssrengine.evaluation.metrics import DECISION_AUC
from ssrengine.evaluation.plots import (
    plot_confusion,
    plot_logprob_hist,
    plot_loss_curves,
    plot_retention,
    plot_rg_share,
)
from ssrengine.evaluation.runs import RETENTION_LABELS, SPLIT_LABELS, RunData, load_run

log = logging.getLogger(__name__)

# The paper's claim, at this scale: SSR's in-domain score within this many points of SFT's ...
CLAIM_POINTS = 2.0
# ... while its average retention drop is at most this fraction of SFT's.
CLAIM_DROP_RATIO = 1 / 3


def relative_drops(
    base: dict[str, float], run: dict[str, float], keys: list[str]
) -> dict[str, float]:
    """100 * (base - run) / base per metric (positive = lost ability); a zero base is skipped."""
    return {k: 100 * (base[k] - run[k]) / base[k] for k in keys if base.get(k)}


# Shown as a column, left out of the headline average: the base model's log-probability of its
# own answers is what SSR trains on (its own accepted answers), so it favours SSR by construction.
NOT_IN_HEADLINE = ("own_answer_prob",)


def average_drop(drops: dict[str, float]) -> float:
    """The headline: mean relative drop over the retention metrics, NOT_IN_HEADLINE left out."""
    kept = [v for k, v in drops.items() if k not in NOT_IN_HEADLINE]
    return sum(kept) / len(kept) if kept else math.nan


def build_table(runs: list[RunData], base: RunData | None) -> dict[str, Any]:
    """Rows of the cross-run table (numbers, not strings) and the retention keys compared."""
    keys = [
        k
        for k in runs[0].eval.retention_metrics
        if all(k in r.eval.retention_metrics for r in runs)
    ]
    splits = [s for s in runs[0].eval.splits if all(s in r.eval.splits for r in runs)]
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "mode": r.mode}
        row["R_share"] = r.build.overall.r_share if r.build else None
        for s in splits:
            m = r.eval.splits[s]
            c = m.confusion.matrix
            # from the confusion matrix, so evals made before `paper` existed still show them
            row[f"{s}/answerable_acc"] = 100 * c[0][0] / max(sum(c[0]), 1)
            row[f"{s}/unanswerable_acc"] = 100 * c[1][1] / max(sum(c[1]), 1)
            row[f"{s}/answer_recall"] = 100 * m.answer_recall
            row[f"{s}/unans_f1"] = 100 * m.unanswerable.f1
            auc = (m.paper or {}).get(DECISION_AUC)
            row[f"{s}/{DECISION_AUC}"] = auc["value"] if auc else None
            row[f"{s}/score"] = m.score
        rm = r.eval.retention_metrics
        for k in keys:
            row[k] = rm[k]
        if base is not None:
            drops = relative_drops(base.eval.retention_metrics, rm, keys)
            row["drops"] = drops
            row["avg_drop"] = average_drop(drops)
        rows.append(row)
    return {"rows": rows, "retention_keys": keys, "splits": splits}


def claim_check(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SSR run against the first SFT run: in-domain within CLAIM_POINTS of SFT (or
    better) and average retention drop at most CLAIM_DROP_RATIO of SFT's."""
    rows = table["rows"]
    sft = next((r for r in rows if r["mode"] == "sft"), None)
    score = "in_domain/score" if "in_domain" in table["splits"] else None
    if sft is None or score is None or "avg_drop" not in sft:
        return []
    out = []
    for r in rows:
        if r["mode"] != "ssr":
            continue
        gap = r[score] - sft[score]
        within = gap >= -CLAIM_POINTS
        drop_ok = (
            r["avg_drop"] <= CLAIM_DROP_RATIO * sft["avg_drop"]
            if sft["avg_drop"] > 0
            else r["avg_drop"] <= 0
        )
        out.append(
            {
                "ssr": r["run"],
                "sft": sft["run"],
                "in_domain_gap_points": gap,
                "ssr_avg_drop": r["avg_drop"],
                "sft_avg_drop": sft["avg_drop"],
                "in_domain_ok": within,
                "retention_ok": drop_ok,
                "holds": within and drop_ok,
            }
        )
    return out


# ------------------------------------------------------------------------------ formatting
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table_columns(table: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(header, row key, digits) of the table, in order."""
    cols = [("run", "run", 0), ("mode", "mode", 0), ("R share", "R_share", 2)]
    for s in table["splits"]:
        lab = SPLIT_LABELS.get(s, s)
        cols += [
            (f"{lab} ans. acc", f"{s}/answerable_acc", 1),
            (f"{lab} unans. acc", f"{s}/unanswerable_acc", 1),
            (f"{lab} ans. recall", f"{s}/answer_recall", 1),
            (f"{lab} unans. F1", f"{s}/unans_f1", 1),
            (f"{lab} decision AUC", f"{s}/{DECISION_AUC}", 3),
            (f"{lab} score (composite)", f"{s}/score", 1),
        ]
    for k in table["retention_keys"]:
        cols.append((RETENTION_LABELS.get(k, k.removeprefix("lm_eval:")), k, 3))
    if table["rows"] and "avg_drop" in table["rows"][0]:
        cols.append(("avg drop vs base (%)", "avg_drop", 1))
    return cols


def markdown_table(table: dict[str, Any]) -> str:
    cols = table_columns(table)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in table["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(k), d) for _, k, d in cols) + " |")
    return "\n".join(lines)


def add_paired_gaps(checks: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    """The paired 95% interval of each claim's in-domain score gap, where both runs have
    per-question details: ``in_domain_gap_ci`` = [lo, hi]."""
    for c in checks:
        for comp in comparisons:
            d = comp["splits"].get("in_domain", {}).get("score")
            if comp["reference"] == c["sft"] and comp["run"] == c["ssr"] and d:
                c["in_domain_gap_ci"] = [d["lo"], d["hi"]]


def claim_lines(checks: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in checks:
        ci = c.get("in_domain_gap_ci")
        ci_text = f" [paired 95% CI {ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
        out.append(
            f"- **{c['ssr']} vs {c['sft']}: the claim {'holds' if c['holds'] else 'does not hold'}.** "
            f"In-domain score {c['in_domain_gap_points']:+.1f} points vs SFT{ci_text} "
            f"(target ≥ {-CLAIM_POINTS:.0f}: {'yes' if c['in_domain_ok'] else 'no'}); "
            f"average retention drop {c['ssr_avg_drop']:.1f}% vs SFT's {c['sft_avg_drop']:.1f}% "
            f"(target ≤ a third of SFT's: {'yes' if c['retention_ok'] else 'no'})."
        )
    return out


# ---------------------------------------------------------------------------------- report
NOTES = """\
**Metrics.** Task (per split): an answer *declines* when it says the documents do not contain
the answer (`judge.is_refusal`). *ans. acc* / *unans. acc*: share of answerable questions
answered / unanswerable questions declined. *ans. F1* / *unans. F1*: F1 of each class, predicted
by answering / declining. *ans. recall*: token recall of the answers to answerable questions (a
declined one scores 0). *decision AUC*: how well log p(refusal | prompt) ranks unanswerable above
answerable questions (0.5 = no signal; no generation involved). *score (composite)*: mean of
unans. F1 and ans. recall, in points; secondary. Intervals: 95% seeded bootstrap over questions
(within each gold class) or probe/MC items; paired intervals resample the same items for both
runs. Retention (higher is better): *probe acc*,
greedy answers to general prompts outside the task judged against reference aliases;
*MC acc*, log-likelihood multiple choice on general questions (lm-eval's `acc`);
*own-answer p/token*, exp(mean log-probability per token) of the base model's own answers to
the probe under the evaluated model (a column only: SSR trains on exactly such answers, so it
favours SSR by construction); lm-eval metrics where run. *avg drop*: mean relative drop of the
other retention metrics vs base, in percent (the paper's headline number)."""


# Config keys shown per run: what tells runs apart.
RUN_KEYS = (
    "run.mode",
    "data.train_file",
    "judge.kind",
    "judge.min_f1",
    "train.max_steps",
    "train.lr",
    "train.lora",
)


def runs_section(runs: list[RunData]) -> list[str]:
    """Markdown: each run's model, examples per eval split and its distinguishing config."""
    from ssrengine.core.provenance import flat_config

    lines = [
        "## Runs",
        "",
        "| run | mode | model | eval examples | config |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        n = ", ".join(
            f"{SPLIT_LABELS.get(s, s)} n={m.n} ({m.n_answerable} answerable)"
            for s, m in r.eval.splits.items()
        )
        flat = flat_config(r.eval.config)
        cfg = ", ".join(f"`{k}={flat[k]}`" for k in RUN_KEYS if k in flat) or "—"
        lines.append(f"| {r.name} | {r.mode} | `{r.eval.model}` | {n or '—'} | {cfg} |")
    return [*lines, ""]


def drop_warnings(runs: list[RunData], base: RunData | None) -> list[str]:
    """Markdown bullets for every retention drop the table cannot show, and why."""
    if base is None:
        return []
    out = []
    for r in runs:
        if r is base:
            continue
        for k in sorted(set(base.eval.retention_metrics) | set(r.eval.retention_metrics)):
            label = RETENTION_LABELS.get(k, k)
            if k not in r.eval.retention_metrics:
                why = f"{r.name} was not evaluated on it"
            elif k not in base.eval.retention_metrics:
                why = f"the base ({base.name}) was not evaluated on it"
            elif not base.eval.retention_metrics[k]:
                why = f"the base ({base.name}) scores 0 on it"
            else:
                continue
            out.append(f"- warning: no {label} drop for {r.name}: {why}.")
    for line in out:
        log.warning("%s", line[2:])
    return [*out, ""] if out else []


def md_inline(text: str) -> str:
    """Markdown inline marks (``**bold**``, ``*emphasis*``, `` `code` ``) as HTML, rest escaped."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", s)


def md_blocks(lines: list[str]) -> str:
    """The markdown this report writes (headings, pipe tables, bullets, paragraphs) as HTML."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{md_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set(":-") for c in cells):  # the |---| rule
                    tag = "th" if not rows else "td"
                    rows.append("".join(f"<{tag}>{md_inline(c)}</{tag}>" for c in cells))
                i += 1
            out.append("<table>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{md_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and lines[i][0] not in "#|-":
                para.append(lines[i])
                i += 1
            out.append(f"<p>{md_inline(' '.join(para))}</p>")
            continue
        i += 1
    return "".join(out)


def write_report(
    runs: list[RunData], base: RunData | None, out: Path, *, title: str = "SSR report"
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(runs, base)
    checks = claim_check(table)
    intervals = interval_tables(runs, table["splits"])
    comparisons = [paired_comparison(a, b, table["splits"]) for a, b in comparison_pairs(runs)]
    comparisons = [c for c in comparisons if c["splits"] or c["retention"]]
    add_paired_gaps(checks, comparisons)
    plots = {
        "rg_share.png": (
            "R/G share of the rehearsal set",
            plot_rg_share(runs, out / "rg_share.png"),
        ),
        "loss_curves.png": ("Training loss", plot_loss_curves(runs, out / "loss_curves.png")),
        "logprob_hist.png": (
            "Log-probability of gold vs own answers under the base model (paper Figure 1)",
            plot_logprob_hist(runs, out / "logprob_hist.png"),
        ),
        "confusion.png": (
            "Answerable/unanswerable confusion matrices (paper Figure 3)",
            plot_confusion(runs, table["splits"], out / "confusion.png"),
        ),
        "retention.png": (
            "Retention metrics vs base",
            plot_retention(table, out / "retention.png"),
        ),
    }
    made = [(f, cap) for f, (cap, ok) in plots.items() if ok]
    base_line = (
        f"Base: **{base.name}**." if base else "No base run given: relative drops are omitted."
    )
    about = runs_section(runs) + drop_warnings(runs, base)
    md = [f"# {title}", "", base_line, "", markdown_table(table), ""]
    md += claim_lines(checks) + ([""] if checks else [])
    stat_md = interval_markdown(intervals) + paired_markdown(comparisons)
    stat_md += significant_lines(comparisons) + ([""] if comparisons else [])
    md += stat_md
    md += about
    md += [NOTES, ""]
    for f, cap in made:
        md += [f"## {cap}", "", f"![{cap}]({f})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    page = _html(title, base_line, table, checks, made, out, stat_md + about)
    atomic_write_text(out / "report.html", page)
    summary = {
        "base": base.name if base else None,
        "table": table,
        "intervals": intervals,
        "paired": comparisons,
        "claim": checks,
        "plots": [f for f, _ in made],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _html(
    title: str,
    base_line: str,
    table: dict[str, Any],
    checks: list[dict[str, Any]],
    plots: list[tuple[str, str]],
    out: Path,
    extra_md: list[str],
) -> str:
    cols = table_columns(table)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), d))}</td>" for _, k, d in cols) + "</tr>"
        for r in table["rows"]
    )
    claims = "".join(f"<li>{md_inline(line[2:])}</li>" for line in claim_lines(checks))
    imgs = "".join(
        f"<h2>{html.escape(cap)}</h2><img alt='{html.escape(cap)}' "
        f"src='data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}'>"
        for f, cap in plots
    )
    notes = md_blocks(NOTES.splitlines())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{md_inline(base_line)}</p>"
        f"<table><tr>{head}</tr>{body}</table><ul>{claims}</ul>{md_blocks(extra_md)}{notes}{imgs}"
        "</body></html>\n"
    )


def pick_base(runs: list[RunData], base: str | None) -> RunData | None:
    if base:
        for r in runs:
            if base in (r.name, str(r.path), r.path.name):
                return r
        raise InputError(f"--base {base!r} is none of the runs given", field="--base")
    return next((r for r in runs if r.mode == "base"), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="evaluated run dirs (each with eval/eval.json)")
    p.add_argument("--out", default="runs/report", help="report directory (default runs/report)")
    p.add_argument("--base", help="which run is the base (default: the one evaluated as a model)")
    p.add_argument("--title", default="SSR report")


def main(args: argparse.Namespace) -> int:
    runs = [load_run(r) for r in args.runs]
    base = pick_base(runs, args.base)
    summary = write_report(runs, base, Path(args.out), title=args.title)
    print(markdown_table(summary["table"]))
    for line in claim_lines(summary["claim"]):
        print(line.replace("**", ""))
    print(f"written: {Path(args.out) / 'report.md'}, report.html, summary.json")
    return 0
