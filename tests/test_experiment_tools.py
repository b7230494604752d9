"""benchmarks/experiment.py: the tuning selection and the flags each run trains with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiment", ROOT / "benchmarks" / "experiment.py")
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


def _tuned(tune: Path, name: str, score: float, data: str = "builtin:validation") -> None:
    ev = tune / name / "eval" / "eval.json"
    ev.parent.mkdir(parents=True)
    ev.write_text(json.dumps({"splits": {"in_domain": {"data": data, "score": score}}}))


def test_select_picks_the_best_validation_score_per_arm_ties_to_the_cheaper(tmp_path, capsys):
    tune = tmp_path / "tune"
    for name, score in {
        "sft-e1-lr5e-5": 60.0,
        "sft-e2-lr1e-4": 71.5,
        "sft-e3-lr1e-4": 71.5,  # tie: fewer epochs wins
        "ssr-e1-lr2e-4": 55.0,
        "ssr-e3-lr5e-5": 58.25,
        "ssr-e3-lr2e-4": 58.25,  # tie, same epochs: the smaller lr wins
    }.items():
        _tuned(tune, name, score)
    (tune / "not-a-tuning-run" / "eval").mkdir(parents=True)
    assert experiment.main(["select", str(tune)]) == 0
    sel = json.loads((tune / "selected.json").read_text())
    assert sel["arms"] == {
        "sft": {"epochs": 2, "lr": "1e-4", "score": 71.5},
        "ssr": {"epochs": 3, "lr": "5e-5", "score": 58.25},
    }
    assert len(sel["runs"]) == 6
    table = (tune / "selection.md").read_text().splitlines()
    assert "| sft | 2 | 1e-4 | 71.5 | **yes** |" in table
    assert "| sft | 3 | 1e-4 | 71.5 |  |" in table
    assert "sft: epochs 2, lr 1e-4" in capsys.readouterr().out

    assert experiment.main(["args", "ssr-balanced", str(tune / "selected.json")]) == 0
    assert capsys.readouterr().out.strip() == "--train.epochs=3 --train.lr=5e-5"
    assert experiment.main(["args", "sft", str(tune / "selected.json")]) == 0
    assert capsys.readouterr().out.strip() == "--train.epochs=2 --train.lr=1e-4"


def test_select_refuses_a_run_scored_on_test(tmp_path):
    _tuned(tmp_path / "tune", "sft-e1-lr1e-4", 70.0, data="builtin:test")
    with pytest.raises(SystemExit, match="must score builtin:validation"):
        experiment.main(["select", str(tmp_path / "tune")])


def test_select_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert experiment.main(["select", str(tmp_path)]) == 2
    assert "no evaluated tuning run" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evidence
def _write_eval(run: Path, name: str, mode: str, declined: list[bool], recall: list[float],
                unans: list[bool], probe: float, mc: float) -> None:  # fmt: skip
    from ssrengine.core.eval_rows import (
        Confusion,
        EvalDetail,
        EvalResult,
        SplitMetrics,
        UnanswerablePRF,
    )
    from ssrengine.evaluation.metrics import split_stats

    details = [
        EvalDetail(id=f"q{i:03d}", unanswerable=u, declined=d, recall=None if u else r)
        for i, (u, d, r) in enumerate(zip(unans, declined, recall))
    ]
    score = float(split_stats(details)["score"](np.arange(len(details))[None, :])[0])
    split = SplitMetrics(
        n=len(details), n_answerable=sum(not u for u in unans),
        confusion=Confusion(["answerable", "unanswerable"], ["answered", "declined"], [[1, 0], [0, 1]]),
        unanswerable=UnanswerablePRF(precision=0, recall=0, f1=0, accuracy=0, support=0),
        answer_recall=0.0, answer_f1=0.0, score=score, data="builtin:test",
    )  # fmt: skip
    ev = EvalResult(
        name=name, kind="run", mode=mode, model=name, base="base", run_dir=str(run),
        splits={"in_domain": split},
        retention={"probe": {"accuracy": probe}, "mc": {"acc": mc},
                   "own_answers": {"prob_per_token": 0.5 if mode == "base" else 0.9}},
        retention_metrics={"probe_acc": probe, "mc_acc": mc, "own_answer_prob": 0.5},
        self_vs_gold=False, options={}, config={}, wall_s=0.0,
    )  # fmt: skip
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps(ev.to_json()))
    (run / "eval" / "in_domain_details.jsonl").write_text(
        "".join(json.dumps(d.to_json()) + "\n" for d in details)
    )
    (run / "eval" / "in_domain.jsonl").write_text("large generations stay in runs/\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


def _experiment(exp: Path) -> list[str]:
    """base + 2 seeds of sft and ssr: SSR declines more answerable questions than SFT."""
    rng = np.random.default_rng(0)
    n = 60
    unans = [i % 3 == 0 for i in range(n)]
    recall = [float(x) for x in rng.uniform(0.5, 1.0, n)]
    _write_eval(exp / "base", "base", "base", [False] * n, recall, unans, probe=0.5, mc=0.4)
    runs = ["base"]
    for seed in (0, 1):
        for arm, p_wrong, probe in (("sft", 0.1, 0.40), ("ssr", 0.3, 0.49)):
            wrong = rng.random(n) < p_wrong + 0.05 * seed
            declined = [bool(u != w) for u, w in zip(unans, wrong)]
            run = f"seed{seed}/{arm}"
            _write_eval(exp / run, run, arm, declined, recall, unans, probe=probe, mc=0.4)
            runs.append(run)
    return runs


def test_collect_summary_and_table_from_the_committed_files(tmp_path, capsys):
    exp, evidence = tmp_path / "runs", tmp_path / "evidence"
    runs = _experiment(exp)
    (exp / "report").mkdir()
    (exp / "report" / "report.md").write_text("# report\n")
    assert experiment.main(["collect", str(exp), str(evidence), "--runs", *runs,
                            "--report", str(exp / "report")]) == 0  # fmt: skip
    assert (evidence / "seed1" / "ssr" / "eval" / "in_domain_details.jsonl").is_file()
    assert (evidence / "report" / "report.md").is_file()
    assert not (evidence / "seed1" / "ssr" / "eval" / "in_domain.jsonl").exists()

    assert experiment.main(["summary", str(evidence)]) == 0
    s = json.loads((evidence / "summary.json").read_text())
    assert list(s["arms"]) == ["sft", "ssr"] and s["questions"] == 60
    for arm in ("sft", "ssr"):
        for seed in ("0", "1"):
            ev = json.loads((exp / f"seed{seed}" / arm / "eval" / "eval.json").read_text())
            assert (
                s["arms"][arm]["seeds"][seed]["in_domain_score"]
                == ev["splits"]["in_domain"]["score"]
            )
    sft, ssr = s["arms"]["sft"], s["arms"]["ssr"]
    # headline drop: probe and MC only (own-answer p/token left out)
    assert sft["seeds"]["0"]["retention_drop"] == pytest.approx((20 + 0) / 2)
    assert ssr["seeds"]["0"]["retention_drop"] == pytest.approx((2 + 0) / 2)
    d = ssr["in_domain_vs_sft"]
    assert d["value"] == pytest.approx(ssr["in_domain_score"] - sft["in_domain_score"])
    assert d["lo"] <= d["value"] <= d["hi"] and d["value"] < 0
    assert ssr["target_met"] is (
        d["lo"] >= -3 and ssr["retention_drop"] <= sft["retention_drop"] / 3
    )

    page = tmp_path / "README.md"
    page.write_text(f"# x\n\n{experiment.START}\nold\n{experiment.END}\n\nafter\n")
    assert experiment.main(["table", str(evidence), "--write", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.endswith("after\n")
    assert f"| ssr | 2 | {ssr['in_domain_score']:.1f} (" in text
    assert experiment.main(["table", str(evidence), "--write", str(page)]) == 0
    assert page.read_text() == text  # idempotent
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert experiment.main(["table", str(evidence), "--write", str(bare)]) == 2
    assert "no <!-- experiment-table" in capsys.readouterr().err


def test_collect_refuses_an_unevaluated_run_and_oversized_evidence(tmp_path, monkeypatch, capsys):
    exp = tmp_path / "runs"
    runs = _experiment(exp)
    assert experiment.main(["collect", str(exp), str(tmp_path / "e"), "--runs", "seed9/ssr"]) == 2
    assert "not evaluated" in capsys.readouterr().err
    monkeypatch.setattr(experiment, "MAX_BYTES", 100)
    assert experiment.main(["collect", str(exp), str(tmp_path / "e"), "--runs", *runs]) == 2
    assert "of evidence, over" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # nothing half-copied


@pytest.mark.parametrize("page", ["README.md", "docs/experiment.md"])
def test_results_table_is_the_committed_evidence(page):
    """The seeded results table in the docs is generated from benchmarks/results/experiment/;
    until its summary.json is committed the table must say there are no seeded results."""
    text = (ROOT / page).read_text()
    block = text.split(experiment.START, 1)[1].split(experiment.END, 1)[0].strip()
    summary = ROOT / "benchmarks" / "results" / "experiment" / "summary.json"
    if summary.is_file():
        assert block == experiment.table_markdown(json.loads(summary.read_text())).strip()
    else:
        assert block.startswith("No seeded results are committed yet")
