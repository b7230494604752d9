"""The experiment's bookkeeping (docs/experiment.md): tuning selection, the settings a run
trains with, and the evidence the results table is made from.

    python benchmarks/experiment.py select runs/experiment/tune
    python benchmarks/experiment.py args ssr-balance runs/experiment/tune/selected.json
    python benchmarks/experiment.py collect runs/experiment benchmarks/results/experiment \
        --runs base seed0/sft ... --report runs/experiment/report-seeds
    python benchmarks/experiment.py summary benchmarks/results/experiment
    python benchmarks/experiment.py table benchmarks/results/experiment --write README.md

`select` reads every tuning run ``ARM-eEPOCHS-lrLR`` (its eval scored builtin:validation only)
and picks, per arm, the epochs and learning rate with the best in-domain score; ties go to fewer
epochs, then the smaller learning rate (the cheaper, gentler setting). It writes selected.json
and selection.md beside the runs. `args` prints the chosen settings of a run's arm as training
flags: runs named ``sft*`` use the SFT arm's, every other run the SSR arm's.

`collect` copies what the table is made from into the repository (each run's eval.json, its
per-question details, build_stats.json and metrics.jsonl; the report; the tuning selection).
`summary` writes summary.json from those files alone: per arm its per-seed in-domain scores and
headline retention drops, and its paired in-domain difference against SFT pooled over seeds
(`ssrengine.evaluation.stats.pooled_paired_difference`: questions and seeds resampled).
`table` renders summary.json as the results table and, with --write, replaces the table between
the markers in README.md and docs/experiment.md, so the pages and the files cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ssrengine.core.io import atomic_write_text
from ssrengine.evaluation import stats
from ssrengine.evaluation.metrics import split_stats
from ssrengine.evaluation.report import average_drop, relative_drops
from ssrengine.evaluation.runs import RunData, load_run

TUNE_NAME = re.compile(r"^(?P<arm>[a-z]+)-e(?P<epochs>\d+)-lr(?P<lr>[0-9.e+-]+)$")


def tuning_results(tune_dir: Path) -> list[dict[str, Any]]:
    """One row per evaluated tuning run: arm, epochs, lr, validation score."""
    rows = []
    for ev in sorted(tune_dir.glob("*/eval/eval.json")):
        m = TUNE_NAME.match(ev.parents[1].name)
        if m is None:
            continue
        split = json.loads(ev.read_text())["splits"]["in_domain"]
        if not split.get("data", "builtin:validation").endswith("validation"):
            raise SystemExit(f"{ev}: tuning must score builtin:validation, not {split['data']}")
        rows.append(
            {
                "arm": m["arm"],
                "epochs": int(m["epochs"]),
                "lr": float(m["lr"]),
                "lr_text": m["lr"],
                "score": split["score"],
            }
        )
    return rows


def select(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm the best validation score; ties: fewer epochs, then the smaller lr."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["arm"], -r["score"], r["epochs"], r["lr"])):
        best.setdefault(r["arm"], r)
    return best


def selection_markdown(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| arm | epochs | lr | validation score | chosen |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arm"], r["epochs"], r["lr"])):
        chosen = "**yes**" if best[r["arm"]] is r else ""
        lines.append(
            f"| {r['arm']} | {r['epochs']} | {r['lr_text']} | {r['score']:.1f} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def cmd_select(tune_dir: Path) -> int:
    rows = tuning_results(tune_dir)
    if not rows:
        print(f"error: no evaluated tuning run in {tune_dir}", file=sys.stderr)
        return 2
    best = select(rows)
    out = {
        "split": "builtin:validation",
        "arms": {
            a: {"epochs": r["epochs"], "lr": r["lr_text"], "score": r["score"]}
            for a, r in best.items()
        },
        "runs": rows,
    }
    (tune_dir / "selected.json").write_text(json.dumps(out, indent=2) + "\n")
    (tune_dir / "selection.md").write_text(selection_markdown(rows, best))
    for a, r in best.items():
        print(f"{a}: epochs {r['epochs']}, lr {r['lr_text']} (validation score {r['score']:.1f})")
    return 0


def arm_of(run: str) -> str:
    return "sft" if run.startswith("sft") else "ssr"


def cmd_args(run: str, selected: Path) -> int:
    arms = json.loads(selected.read_text())["arms"]
    arm = arms.get(arm_of(run))
    if arm is None:
        print(f"error: {selected} has no {arm_of(run)!r} arm", file=sys.stderr)
        return 2
    print(f"--train.epochs={arm['epochs']} --train.lr={arm['lr']}")
    return 0


# ------------------------------------------------------------------------------ evidence
# Per run: what the report and summary read (eval.json, per-question details), and the
# training's own record; the split generations and probe answers stay in runs/ (large).
RUN_FILES = ("eval/eval.json", "eval/*_details.jsonl", "build_stats.json", "metrics.jsonl")
REPORT_FILES = ("report.md", "summary.json", "*.png")
MAX_BYTES = 12 * 2**20  # the evidence must stay a few MB: refuse anything larger
# The target (docs/experiment.md): the pooled paired 95% interval of SSR − SFT in-domain has a
# lower bound >= TARGET_LO points, with a headline retention drop <= 1/3 of SFT's.
TARGET_LO = -3.0


def cmd_collect(exp: Path, out: Path, runs: list[str], report: Path | None) -> int:
    copies: list[tuple[Path, Path]] = []
    for run in runs:
        if not (exp / run / "eval" / "eval.json").is_file():
            print(f"error: {exp / run}: not evaluated (no eval/eval.json)", file=sys.stderr)
            return 2
        copies += [
            (f, out / run / f.relative_to(exp / run))
            for g in RUN_FILES
            for f in (exp / run).glob(g)
        ]
    if report is not None:
        copies += [(f, out / "report" / f.name) for g in REPORT_FILES for f in report.glob(g)]
    tune = exp / "tune"
    copies += [
        (tune / n, out / "tune" / n)
        for n in ("selected.json", "selection.md")
        if (tune / n).is_file()
    ]
    size = sum(src.stat().st_size for src, _ in copies)
    if size > MAX_BYTES:
        print(
            f"error: {size / 2**20:.1f} MB of evidence, over {MAX_BYTES / 2**20:.0f} MB",
            file=sys.stderr,
        )
        return 2
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    print(f"copied {len(copies)} files ({size / 2**20:.2f} MB) into {out}")
    return 0


def _seed_runs(evidence: Path) -> dict[str, dict[int, Path]]:
    """{arm: {seed: run dir}} from the seedS/ARM folders."""
    arms: dict[str, dict[int, Path]] = {}
    for ev in sorted(evidence.glob("seed*/*/eval/eval.json")):
        run = ev.parents[1]
        arms.setdefault(run.name, {})[int(run.parent.name.removeprefix("seed"))] = run
    return arms


def _details(run: RunData, ids: list[str]) -> list[Any]:
    by_id = {d.id: d for d in run.details["in_domain"]}
    return [by_id[i] for i in ids]


def summarize(evidence: Path) -> dict[str, Any]:
    base = load_run(evidence / "base")
    arms = {
        a: {s: load_run(p) for s, p in seeds.items()} for a, seeds in _seed_runs(evidence).items()
    }
    if "sft" not in arms:
        raise SystemExit(f"{evidence}: no sft arm (seedS/sft) to compare against")
    every = [r for seeds in arms.values() for r in seeds.values()]
    ids = sorted(set.intersection(*({d.id for d in r.details["in_domain"]} for r in every)))
    strata = [int(d.unanswerable) for d in _details(every[0], ids)]

    def score_stats(seeds: dict[int, RunData]) -> list[stats.Stat]:
        return [split_stats(_details(r, ids))["score"] for _, r in sorted(seeds.items())]

    sft_stats = score_stats(arms["sft"])
    out: dict[str, Any] = {"questions": len(ids), "base": base.name, "arms": {}}
    for arm, seeds in sorted(arms.items(), key=lambda kv: (kv[0] != "sft", kv[0] != "ssr", kv[0])):
        per_seed = {}
        for s, r in sorted(seeds.items()):
            drops = relative_drops(
                base.eval.retention_metrics,
                r.eval.retention_metrics,
                list(r.eval.retention_metrics),
            )
            per_seed[str(s)] = {
                "in_domain_score": r.eval.splits["in_domain"].score,
                "retention_drop": average_drop(drops),
            }
        entry: dict[str, Any] = {"seeds": per_seed}
        entry["in_domain_score"] = sum(v["in_domain_score"] for v in per_seed.values()) / len(
            per_seed
        )
        entry["retention_drop"] = sum(v["retention_drop"] for v in per_seed.values()) / len(
            per_seed
        )
        if arm != "sft":
            d = stats.pooled_paired_difference(
                sft_stats, score_stats(seeds), len(ids), strata=strata
            )
            entry["in_domain_vs_sft"] = {k: d[k] for k in ("value", "lo", "hi")}
        out["arms"][arm] = entry
    sft_drop = out["arms"]["sft"]["retention_drop"]
    for arm, entry in out["arms"].items():
        if arm == "sft":
            continue
        entry["target_met"] = bool(
            entry["in_domain_vs_sft"]["lo"] >= TARGET_LO and entry["retention_drop"] <= sft_drop / 3
        )
    return out


def cmd_summary(evidence: Path) -> int:
    summary = summarize(evidence)
    atomic_write_text(evidence / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(table_markdown(summary))
    return 0


def table_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| arm | seeds | in-domain score (per seed) | SSR − SFT in-domain, pooled [95%] | headline retention drop (per seed) | target met |",
        "|---|---|---|---|---|---|",
    ]
    for arm, e in summary["arms"].items():
        seeds = e["seeds"]
        scores = ", ".join(f"{v['in_domain_score']:.1f}" for v in seeds.values())
        drops = ", ".join(f"{v['retention_drop']:.1f}" for v in seeds.values())
        d = e.get("in_domain_vs_sft")
        diff = "–" if d is None else f"{d['value']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
        met = "–" if "target_met" not in e else ("**yes**" if e["target_met"] else "no")
        lines.append(
            f"| {arm} | {len(seeds)} | {e['in_domain_score']:.1f} ({scores}) | {diff} | "
            f"{e['retention_drop']:.1f}% ({drops}) | {met} |"
        )
    return "\n".join(lines) + "\n"


START, END = (
    "<!-- experiment-table: generated by benchmarks/experiment.py table -->",
    "<!-- /experiment-table -->",
)


def cmd_table(evidence: Path, write: list[Path]) -> int:
    table = table_markdown(json.loads((evidence / "summary.json").read_text()))
    if not write:
        print(table, end="")
    for page in write:
        text = page.read_text()
        if START not in text or END not in text:
            print(f"error: {page}: no {START} ... {END} markers to replace", file=sys.stderr)
            return 2
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        atomic_write_text(page, f"{head}{START}\n{table}{END}{tail}")
        print(f"wrote the table into {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("select", help="pick each arm's epochs and lr on validation")
    s.add_argument("tune_dir", type=Path)
    a = sub.add_parser("args", help="the training flags of a run's arm")
    a.add_argument("run")
    a.add_argument("selected", type=Path)
    c = sub.add_parser("collect", help="copy the evidence of evaluated runs into the repository")
    c.add_argument("exp", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--runs", nargs="+", required=True)
    c.add_argument("--report", type=Path)
    m = sub.add_parser("summary", help="summary.json from the collected evidence")
    m.add_argument("evidence", type=Path)
    t = sub.add_parser("table", help="the results table from summary.json")
    t.add_argument("evidence", type=Path)
    t.add_argument("--write", nargs="*", type=Path, default=[])
    args = p.parse_args(argv)
    if args.cmd == "select":
        return cmd_select(args.tune_dir)
    if args.cmd == "collect":
        return cmd_collect(args.exp, args.out, args.runs, args.report)
    if args.cmd == "summary":
        return cmd_summary(args.evidence)
    if args.cmd == "table":
        return cmd_table(args.evidence, args.write)
    return cmd_args(args.run, args.selected)


if __name__ == "__main__":
    sys.exit(main())
