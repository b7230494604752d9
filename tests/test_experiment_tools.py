"""benchmarks/experiment.py: the tuning selection and the flags each run trains with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
