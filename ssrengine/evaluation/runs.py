"""One evaluated run as the report reads it: eval.json, the per-question details, metrics.jsonl
and build_stats.json of a run directory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ssrengine.core.errors import InputError
from ssrengine.core.eval_rows import EvalDetail, EvalResult, MCDetail, ProbeDetail, SelfVsGold
from ssrengine.core.io import read_json
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import BuildStats, MetricRow, RunDir
from ssrengine.evaluation.metrics import retention_metrics

RETENTION_LABELS = {
    "probe_acc": "probe acc",
    "mc_acc": "MC acc",
    "own_answer_prob": "own-answer p/token",
}
SPLIT_LABELS = {"in_domain": "in-domain", "out_of_domain": "OOD"}


@dataclass
class RunData:
    name: str
    path: Path
    eval: EvalResult
    metrics: list[MetricRow] = field(default_factory=list)
    build: BuildStats | None = None
    fig1: SelfVsGold | None = None
    details: dict[str, list[EvalDetail]] = field(default_factory=dict)  # by split
    probe_correct: dict[str, bool] = field(default_factory=dict)  # by probe id
    mc_correct: dict[str, bool] = field(default_factory=dict)  # by MC item id

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
    details = {
        s: list(read_typed(rd.eval.split_details(s), EvalDetail))
        for s in data.splits
        if rd.eval.split_details(s).is_file()
    }
    probe = (
        {d.id: d.correct for d in read_typed(rd.eval.probe_details, ProbeDetail)}
        if rd.eval.probe_details.is_file()
        else {}
    )
    mc = (
        {d.id: d.correct for d in read_typed(rd.eval.mc_details, MCDetail)}
        if rd.eval.mc_details.is_file()
        else {}
    )
    return RunData(
        data.name or rd.root.name, rd.root, data, metrics, build, fig1, details, probe, mc
    )
