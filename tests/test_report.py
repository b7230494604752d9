import json
import math

import pytest

from ssrengine.cli import main as cli_main
from ssrengine.core.eval_rows import (
    Confusion,
    EvalResult,
    SelfVsGold,
    SelfVsGoldRow,
    SplitMetrics,
    UnanswerablePRF,
)
from ssrengine.evaluation.report import (
    average_drop,
    build_table,
    claim_check,
    load_run,
    relative_drops,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _split(score_f1, recall, matrix):
    return SplitMetrics(
        n=sum(map(sum, matrix)),
        n_answerable=sum(matrix[0]),
        confusion=Confusion(["answerable", "unanswerable"], ["answered", "declined"], matrix),
        unanswerable=UnanswerablePRF(
            precision=0.0, recall=0.0, f1=score_f1, accuracy=0.0, support=0
        ),
        answer_recall=recall,
        answer_f1=recall,
        score=100 * (score_f1 + recall) / 2,
    )


def _write_run(
    root, name, mode, *, f1, recall, probe, mc, own, build=None, losses=None, fig1=False
):
    d = root / name
    (d / "eval").mkdir(parents=True)
    ev = EvalResult(
        name=name,
        kind="run",
        mode=mode,
        model=name,
        base="base",
        run_dir=str(d),
        splits={
            "in_domain": _split(f1, recall, [[60, 10], [5, 25]]),
            "out_of_domain": _split(f1 - 0.1, recall - 0.1, [[50, 20], [10, 20]]),
        },
        retention={
            "probe": {"accuracy": probe},
            "mc": {"acc": mc},
            "own_answers": {"prob_per_token": own},
        },
        retention_metrics={"probe_acc": probe, "mc_acc": mc, "own_answer_prob": own},
        self_vs_gold=fig1,
        options={},
        config={},
        wall_s=0.0,
    )
    (d / "eval" / "eval.json").write_text(json.dumps(ev.to_json()))
    if build is not None:
        n = 100
        s = {"n": n, "self": build, "paraphrase": 0, "gold": n - build, "R_share": build / n}
        (d / "build_stats.json").write_text(
            json.dumps({"overall": s, "answerable": s, "unanswerable": {**s, "n": 0}})
        )
    if losses:
        rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if fig1:
        rows = [
            SelfVsGoldRow(f"x{i}", False, True, -3.0 - 0.1 * i, -0.5 - 0.05 * i) for i in range(20)
        ]
        doc = SelfVsGold(model="base", unit="mean log-probability per answer token", rows=rows)
        (d / "eval" / "self_vs_gold.json").write_text(json.dumps(doc.to_json()))
    return d


@pytest.fixture
def three_runs(tmp_path):
    base = _write_run(tmp_path, "base", "base", f1=0.2, recall=0.5, probe=0.5, mc=0.4, own=0.8)
    sft = _write_run(
        tmp_path, "sft", "sft", f1=0.8, recall=0.7, probe=0.4, mc=0.3, own=0.4,
        build=0, losses=[2.0, 1.5, 1.2],
    )  # fmt: skip
    ssr = _write_run(
        tmp_path, "ssr", "ssr", f1=0.78, recall=0.71, probe=0.5, mc=0.38, own=0.76,
        build=40, losses=[1.0, 0.8, 0.7], fig1=True,
    )  # fmt: skip
    return base, sft, ssr


def test_relative_drop_hand_computed():
    base = {"a": 0.5, "b": 0.4, "c": 0.8, "z": 0.0}
    run = {"a": 0.4, "b": 0.3, "c": 0.4, "z": 0.1}
    d = relative_drops(base, run, ["a", "b", "c", "z"])
    assert d == pytest.approx({"a": 20.0, "b": 25.0, "c": 50.0})  # zero base skipped
    assert average_drop(d) == pytest.approx(95 / 3)
    assert average_drop({**d, "own_answer_prob": 90.0}) == pytest.approx(95 / 3)
    assert math.isnan(average_drop({}))


def test_table_and_claim(three_runs):
    runs = [load_run(p) for p in three_runs]
    table = build_table(runs, runs[0])
    rows = {r["run"]: r for r in table["rows"]}
    assert table["splits"] == ["in_domain", "out_of_domain"]
    assert rows["base"]["avg_drop"] == pytest.approx(0.0)
    # own-answer p/token: a column and a drop, but not in the headline (favours SSR by design)
    assert rows["sft"]["drops"]["own_answer_prob"] == pytest.approx(50)
    assert rows["sft"]["avg_drop"] == pytest.approx((20 + 25) / 2)
    assert rows["ssr"]["avg_drop"] == pytest.approx((0 + 5) / 2)
    assert rows["sft"]["in_domain/score"] == pytest.approx(75.0)
    assert rows["ssr"]["R_share"] == 0.4 and rows["base"]["R_share"] is None
    [c] = claim_check(table)
    assert c["in_domain_gap_points"] == pytest.approx(74.5 - 75.0)
    assert c["in_domain_ok"] and c["retention_ok"] and c["holds"]


def test_claim_fails_when_ssr_loses_task_score_or_retention(tmp_path):
    base = _write_run(tmp_path, "b", "base", f1=0.2, recall=0.5, probe=0.5, mc=0.4, own=0.8)
    sft = _write_run(tmp_path, "s", "sft", f1=0.8, recall=0.7, probe=0.4, mc=0.3, own=0.4)
    bad = _write_run(tmp_path, "r", "ssr", f1=0.7, recall=0.7, probe=0.45, mc=0.35, own=0.7)
    runs = [load_run(p) for p in (base, sft, bad)]
    [c] = claim_check(build_table(runs, runs[0]))
    assert c["in_domain_gap_points"] == pytest.approx(-5.0)
    assert not c["in_domain_ok"] and not c["retention_ok"] and not c["holds"]


def test_report_writes_markdown_html_and_plots(three_runs, tmp_path):
    out = tmp_path / "report"
    argv = ["report", *map(str, three_runs), "--out", str(out)]
    assert cli_main(argv) == 0
    for f in (
        "rg_share.png",
        "loss_curves.png",
        "logprob_hist.png",
        "confusion.png",
        "retention.png",
    ):
        assert (out / f).read_bytes()[:8] == PNG, f
    md = (out / "report.md").read_text()
    assert "| run | mode | R share | in-domain ans. acc | in-domain unans. acc" in md
    # answerable acc 60/70, unanswerable acc 25/30 from the confusion matrix; no AUC recorded
    assert "| ssr | ssr | 0.40 | 85.7 | 83.3 | 71.0 | 78.0 | – | 74.5 |" in md
    assert "the claim holds" in md
    assert "![" in md and "(logprob_hist.png)" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"] == "base" and summary["claim"][0]["holds"]


def test_report_without_base_or_training_artifacts(tmp_path):
    a = _write_run(tmp_path, "a", "ssr", f1=0.5, recall=0.5, probe=0.5, mc=0.5, own=0.5)
    summary = write_report([load_run(a)], None, tmp_path / "out")
    assert summary["plots"] == ["confusion.png"]
    assert "avg_drop" not in summary["table"]["rows"][0]
    assert "No base run given" in (tmp_path / "out" / "report.md").read_text()


def test_report_errors(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "run `python -m ssrengine eval" in capsys.readouterr().err
    a = _write_run(tmp_path, "a", "ssr", f1=0.5, recall=0.5, probe=0.5, mc=0.5, own=0.5)
    assert cli_main(["report", str(a), "--base", "zzz", "--out", str(tmp_path / "o")]) == 2


def _details(run_dir, split, declined_answerable, declined_unanswerable, n=100, start=0):
    """Per-question details: n answerable then n unanswerable questions, ``declined_*`` of each
    class declined from index ``start`` on; answered answerable ones recall 1."""
    from ssrengine.core.eval_rows import EvalDetail

    rows = [
        EvalDetail(f"q{i}", False, d, 0.0 if d else 1.0)
        for i in range(n)
        for d in [start <= i < start + declined_answerable]
    ] + [EvalDetail(f"u{i}", True, start <= i < start + declined_unanswerable) for i in range(n)]
    path = run_dir / "eval" / f"{split}_details.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows))


def test_paired_comparison_flags_significant_differences(three_runs, tmp_path):
    from ssrengine.evaluation.report import comparison_pairs, paired_comparison

    base, sft, ssr = three_runs
    _details(base, "in_domain", 0, 0)
    _details(sft, "in_domain", 20, 80)  # declines when it should, mostly
    _details(ssr, "in_domain", 22, 78, start=5)  # as SFT: a few better, a few worse
    for d, correct in (
        (base, [1, 1, 0, 1] * 25),
        (sft, [1, 0, 0, 0] * 25),
        (ssr, [1, 1, 0, 1] * 25),
    ):
        rows = [{"id": f"m{i}", "correct": bool(c)} for i, c in enumerate(correct)]
        (d / "eval" / "mc_details.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [load_run(p) for p in three_runs]
    pairs = [(a.name, b.name) for a, b in comparison_pairs(runs)]
    assert pairs == [("base", "sft"), ("base", "ssr"), ("sft", "ssr")]
    c = paired_comparison(runs[0], runs[1], ["in_domain"])
    d = c["splits"]["in_domain"]
    assert d["n"] == 200
    assert (
        d["unanswerable_acc"]["value"] == pytest.approx(80.0)
        and d["unanswerable_acc"]["significant"]
    )
    assert (
        d["answerable_acc"]["value"] == pytest.approx(-20.0) and d["answerable_acc"]["significant"]
    )
    assert c["retention"]["mc_acc"]["value"] == pytest.approx(-50.0)
    assert c["retention"]["mc_acc"]["significant"]
    close = paired_comparison(runs[1], runs[2], ["in_domain"])["splits"]["in_domain"]
    assert close["answerable_acc"]["value"] == pytest.approx(-2.0)
    assert not close["answerable_acc"]["significant"] and not close["score"]["significant"]
    out = tmp_path / "report"
    summary = write_report(runs, runs[0], out)
    assert len(summary["paired"]) == 3
    md = (out / "report.md").read_text()
    assert "Paired differences" in md
    assert "- ssr vs sft: significant: MC acc +50.0." in md
    assert "**+80.0 [" in md
    # the claim's in-domain gap carries its paired interval
    gap = summary["paired"][2]["splits"]["in_domain"]["score"]
    assert summary["claim"][0]["in_domain_gap_ci"] == [gap["lo"], gap["hi"]]
    assert f"[paired 95% CI {gap['lo']:+.1f}, {gap['hi']:+.1f}]" in md
