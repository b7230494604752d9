"""``python -m ssrengine report RUN...``: one table across evaluated runs, plots, markdown/HTML.

Each RUN is a directory with eval/eval.json (`python -m ssrengine eval`); metrics.jsonl and
build_stats.json are used where present. The base is the run evaluated as a model (mode
"base") or --base. Per retention metric the relative drop vs base is 100 * (base - run) / base;
"avg drop" is its mean over the metrics every compared run has: the paper's headline number.

Outputs in --out: report.md (PNG links), report.html (self-contained, images inlined),
summary.json, and the plots: rg_share.png, loss_curves.png, logprob_hist.png (paper Figure 1),
confusion.png (Figure 3), retention.png.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ssrengine.errors import InputError
from ssrengine.io import atomic_write_text, read_json
from ssrengine.metrics import retention_metrics
from ssrengine.rundir import (
    SOURCES,
    BuildStats,
    EvalResult,
    MetricRow,
    RunDir,
    SelfVsGold,
    read_typed,
)

RETENTION_LABELS = {
    "probe_acc": "probe acc",
    "mc_acc": "MC acc",
    "own_answer_prob": "own-answer p/token",
}
SPLIT_LABELS = {"in_domain": "in-domain", "out_of_domain": "OOD"}
# The paper's claim, at this scale: SSR's in-domain score within this many points of SFT's ...
CLAIM_POINTS = 2.0
# ... while its average retention drop is at most this fraction of SFT's.
CLAIM_DROP_RATIO = 1 / 3


@dataclass
class RunData:
    name: str
    path: Path
    eval: EvalResult
    metrics: list[MetricRow] = field(default_factory=list)
    build: BuildStats | None = None
    fig1: SelfVsGold | None = None

    @property
    def mode(self) -> str:
        return self.eval.mode


def load_run(path: str | Path) -> RunData:
    rd = RunDir(Path(path))
    ev = rd.eval.eval_json
    if not ev.is_file():
        raise InputError(f"missing; run `python -m ssrengine eval {rd.root}` first", file=str(ev))
    data = EvalResult.read(ev)
    # recomputed, so a report always applies the current definition
    data = replace(data, retention_metrics=retention_metrics(data.retention))
    metrics = list(read_typed(rd.metrics, MetricRow)) if rd.metrics.is_file() else []
    build = BuildStats.read(rd.build_stats) if rd.build_stats.is_file() else None
    fig1_path = rd.eval.self_vs_gold
    fig1 = (
        SelfVsGold.from_json(read_json(fig1_path), str(fig1_path)) if fig1_path.is_file() else None
    )
    return RunData(data.name or rd.root.name, rd.root, data, metrics, build, fig1)


def relative_drops(
    base: dict[str, float], run: dict[str, float], keys: list[str]
) -> dict[str, float]:
    """100 * (base - run) / base per metric (positive = lost ability); a zero base is skipped."""
    return {k: 100 * (base[k] - run[k]) / base[k] for k in keys if base.get(k)}


def average_drop(drops: dict[str, float]) -> float:
    return sum(drops.values()) / len(drops) if drops else math.nan


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
            row[f"{s}/score"] = m.score
            row[f"{s}/unans_f1"] = 100 * m.unanswerable.f1
            row[f"{s}/answer_recall"] = 100 * m.answer_recall
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
            (f"{lab} score", f"{s}/score", 1),
            (f"{lab} unans. F1", f"{s}/unans_f1", 1),
            (f"{lab} ans. recall", f"{s}/answer_recall", 1),
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


def claim_lines(checks: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in checks:
        out.append(
            f"- **{c['ssr']} vs {c['sft']}: the claim {'holds' if c['holds'] else 'does not hold'}.** "
            f"In-domain score {c['in_domain_gap_points']:+.1f} points vs SFT "
            f"(target ≥ {-CLAIM_POINTS:.0f}: {'yes' if c['in_domain_ok'] else 'no'}); "
            f"average retention drop {c['ssr_avg_drop']:.1f}% vs SFT's {c['sft_avg_drop']:.1f}% "
            f"(target ≤ a third of SFT's: {'yes' if c['retention_ok'] else 'no'})."
        )
    return out


# ----------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rg_share(runs: list[RunData], path: Path) -> bool:
    """Stacked bars: share of R (own answers), paraphrases and G (gold) per run and subset."""
    have = [r for r in runs if r.build]
    if not have:
        return False
    plt = _plt()
    labels: list[str] = []
    parts: dict[str, list[float]] = {k: [] for k in SOURCES}
    for r in have:
        assert r.build is not None
        for subset, s in r.build.subsets().items():
            if not s.n:
                continue
            labels.append(f"{r.name}\n{subset}")
            for k in parts:
                parts[k].append(s.share(k))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 4))
    bottom = [0.0] * len(labels)
    colors = {"self": "tab:green", "paraphrase": "tab:olive", "gold": "tab:gray"}
    names = {"self": "R (own answer)", "paraphrase": "paraphrase", "gold": "G (gold)"}
    for k, vals in parts.items():
        ax.bar(labels, vals, bottom=bottom, label=names[k], color=colors[k])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of training targets")
    ax.set_ylim(0, 1)
    ax.set_title("Rehearsal set: R / G share")
    ax.legend(loc="upper right", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_loss_curves(runs: list[RunData], path: Path) -> bool:
    have = [r for r in runs if r.metrics]
    if not have:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in have:
        ax.plot(
            [m.step for m in r.metrics],
            [m.loss for m in r.metrics],
            marker=".",
            label=f"{r.name} ({r.mode})",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_logprob_hist(runs: list[RunData], path: Path) -> bool:
    """Paper Figure 1: per-token log-probability of gold vs own answers under the base model."""
    have = [r for r in runs if r.fig1 and r.fig1.rows]
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(6 * len(have), 4), squeeze=False)
    for ax, r in zip(axes[0], have):
        assert r.fig1 is not None
        rows = r.fig1.rows
        gold = [x.gold_logprob for x in rows]
        own = [x.own_logprob for x in rows]
        lo = min(gold + own)
        bins = [lo + i * (0 - lo) / 30 for i in range(31)]
        ax.hist(
            gold,
            bins=bins,
            alpha=0.6,
            label=f"gold (mean {sum(gold) / len(gold):.2f})",
            color="tab:gray",
        )
        ax.hist(
            own,
            bins=bins,
            alpha=0.6,
            label=f"own (mean {sum(own) / len(own):.2f})",
            color="tab:green",
        )
        ax.set_xlabel("log-probability per answer token under the base model")
        ax.set_ylabel("training examples")
        ax.set_title(f"Gold vs own answers ({r.name}, n={len(rows)})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_confusion(runs: list[RunData], splits: list[str], path: Path) -> bool:
    """Paper Figure 3: answerable/unanswerable confusion matrices, runs x splits."""
    if not splits:
        return False
    plt = _plt()
    fig, axes = plt.subplots(
        len(splits), len(runs), figsize=(2.8 * len(runs), 2.6 * len(splits)), squeeze=False
    )
    for i, s in enumerate(splits):
        for j, r in enumerate(runs):
            ax = axes[i][j]
            c = r.eval.splits[s].confusion
            m = c.matrix
            tot = [max(sum(row), 1) for row in m]
            frac = [[v / t for v in row] for row, t in zip(m, tot)]
            ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
            for a in range(2):
                for b in range(2):
                    color = "white" if frac[a][b] > 0.6 else "black"
                    ax.text(
                        b,
                        a,
                        f"{m[a][b]}\n{frac[a][b]:.0%}",
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=8,
                    )
            ax.set_xticks([0, 1], labels=c.cols, fontsize=7)
            ax.set_yticks([0, 1], labels=c.rows, fontsize=7)
            ax.set_title(f"{r.name} · {SPLIT_LABELS.get(s, s)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_retention(table: dict[str, Any], path: Path) -> bool:
    rows = [r for r in table["rows"] if "drops" in r and r["mode"] != "base"]
    keys = table["retention_keys"]
    if not rows or not keys:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(keys) * len(rows) / 2), 4))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(
            xs, [-r["drops"].get(k, 0.0) for k in keys], width, label=f"{r['run']} ({r['mode']})"
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(keys))],
        labels=[RETENTION_LABELS.get(k, k) for k in keys],
        fontsize=8,
    )
    ax.set_ylabel("change vs base (%)")
    ax.set_title("Retention of general ability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------- report
NOTES = """\
**Metrics.** Task (per split): an answer *declines* when it says the documents do not contain
the answer (`judge.is_refusal`). *unans. F1*: F1 of detecting unanswerable questions by
declining. *ans. recall*: token recall of the answers to answerable questions (a declined one
scores 0). *score*: mean of the two, in points. Retention (higher is better): *probe acc*,
greedy answers to general prompts outside the task judged against reference aliases;
*MC acc*, log-likelihood multiple choice on general questions (lm-eval's `acc`);
*own-answer p/token*, exp(mean log-probability per token) of the base model's own answers to
the probe under the evaluated model; lm-eval metrics where run. *avg drop*: mean relative drop
of the retention metrics vs base, in percent (the paper's headline number)."""


def write_report(
    runs: list[RunData], base: RunData | None, out: Path, *, title: str = "SSR report"
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(runs, base)
    checks = claim_check(table)
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
    md = [f"# {title}", "", base_line, "", markdown_table(table), ""]
    md += claim_lines(checks) + ([""] if checks else [])
    md += [NOTES, ""]
    for f, cap in made:
        md += [f"## {cap}", "", f"![{cap}]({f})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(title, base_line, table, checks, made, out))
    summary = {
        "base": base.name if base else None,
        "table": table,
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
) -> str:
    cols = table_columns(table)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), d))}</td>" for _, k, d in cols) + "</tr>"
        for r in table["rows"]
    )
    claims = "".join(
        f"<li>{html.escape(line[2:].replace('**', ''))}</li>" for line in claim_lines(checks)
    )
    imgs = "".join(
        f"<h2>{html.escape(cap)}</h2><img alt='{html.escape(cap)}' "
        f"src='data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}'>"
        for f, cap in plots
    )
    notes = html.escape(NOTES).replace("\n", " ")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(base_line.replace('**', ''))}</p>"
        f"<table><tr>{head}</tr>{body}</table><ul>{claims}</ul><p>{notes}</p>{imgs}</body></html>\n"
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
