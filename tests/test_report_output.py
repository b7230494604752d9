"""The report's presentation: HTML from its markdown, the runs shown, plots and warnings."""

import json
import sys

from ssrengine.cli import main as cli_main
from ssrengine.evaluation.report import load_run, md_blocks, plot_loss_curves, write_report
from tests.test_report import _write_run, three_runs  # noqa: F401  (a fixture)


def test_html_renders_the_markdown(three_runs, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    assert cli_main(["report", *map(str, three_runs), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "**" not in page and "`" not in page
    assert "<strong>Metrics.</strong>" in page and "<em>declines</em>" in page
    assert "<code>judge.is_refusal</code>" in page
    assert md_blocks(["| a | b |", "|---|---|", "| 1 | *x* |"]) == (
        "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><em>x</em></td></tr></table>"
    )


def test_each_run_shows_its_config_and_n(tmp_path):
    a = _write_run(tmp_path, "a", "ssr", f1=0.5, recall=0.5, probe=0.5, mc=0.5, own=0.5)
    ev = json.loads((a / "eval" / "eval.json").read_text())
    ev["config"] = {"run": {"mode": "ssr"}, "train": {"max_steps": 12, "lr": 2e-5}}
    (a / "eval" / "eval.json").write_text(json.dumps(ev))
    write_report([load_run(a)], None, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    row = "| a | ssr | `a` | in-domain n=100 (70 answerable), OOD n=100 (70 answerable) |"
    assert row + " `run.mode=ssr`, `train.max_steps=12`, `train.lr=2e-05` |" in md
    assert (
        "<td>in-domain n=100 (70 answerable), OOD n=100 (70 answerable)</td>"
        in (tmp_path / "out" / "report.html").read_text()
    )


def test_a_drop_that_cannot_be_computed_is_a_warning(tmp_path, caplog):
    base = _write_run(tmp_path, "base", "base", f1=0.2, recall=0.5, probe=0.5, mc=0.0, own=0.8)
    sft = _write_run(tmp_path, "sft", "sft", f1=0.8, recall=0.7, probe=0.4, mc=0.3, own=0.4)
    runs = [load_run(base), load_run(sft)]
    write_report(runs, runs[0], tmp_path / "out")
    want = "warning: no MC acc drop for sft: the base (base) scores 0 on it."
    assert want in (tmp_path / "out" / "report.md").read_text()
    assert want in (tmp_path / "out" / "report.html").read_text()
    assert want[len("warning: ") :] in caplog.text


def test_loss_plot_steps_are_integers_and_show_validation(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    a = _write_run(
        tmp_path, "a", "ssr", f1=0.5, recall=0.5, probe=0.5, mc=0.5, own=0.5, losses=[2, 1.5, 1]
    )
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["eval_loss"] = 1.7
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    assert plot_loss_curves([load_run(a)], tmp_path / "l.png")
    ax = figs[0].axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(t == int(t) for t in ticks)
    assert [line.get_label() for line in ax.get_lines()] == ["a (ssr)", "a validation"]


def test_missing_matplotlib_is_one_line(three_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when not installed
    assert cli_main(["report", *map(str, three_runs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "need matplotlib" in err and err.count("\n") == 1
