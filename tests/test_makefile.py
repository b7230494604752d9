"""The experiment targets of the Makefile, run with PY set to a script that prints its
arguments (and, for `eval`, writes the eval.json the real command would): each run trains with
its config and flags, SSR runs wait for the one shared generate stage, and a rerun redoes
nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


# `ssrengine eval RUN ...` writes RUN/eval/eval.json; `eval MODEL ... --out OUT` OUT/eval/.
FAKE_PY = """#!/bin/sh
if [ "$2" = args ]; then echo "--train.epochs=2 --train.lr=5e-5"; exit 0; fi
echo "$@"
if [ "$3" = eval ]; then
  out=$4; prev=; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
  mkdir -p "$out/eval" && echo '{}' > "$out/eval/eval.json"
fi
"""


def _make(exp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    py = exp.parent / "fake-python"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    # A stamp newer than every prerequisite of the install rule: nothing is installed (the
    # rule runs pip in VENV, not PY). A file the Makefile names as a target would be "remade".
    stamp = exp.parent / "installed-stamp"
    stamp.touch()
    cmd = ["make", "-s", "-j1", f"EXP={exp}", f"PY={py}", f"STAMP={stamp}", *args]
    # Run under `make test`: not as a sub-make of it (no inherited flags or jobserver).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


SAVE = "--train.save_every=10"  # EXP_SAVE: a killed run resumes from its last 10-step checkpoint


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("-m ssrengine")]


def test_every_run_trains_with_its_config_and_flags(tmp_path):
    exp = tmp_path / "exp"
    res = _make(exp, "experiment-options", "experiment-ablations")
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    train = {c.rsplit("--run.dir=", 1)[1]: c for c in cmds if "ssrengine.train" in c}
    ssr = "--config configs/experiment_ssr.toml"
    expected = {
        "sft": "--config configs/experiment_sft.toml",
        "ssr": ssr,
        "ssr-prefix": f"{ssr} --judge.prefix=true",
        "ssr-balanced": f"{ssr} --judge.gold_answerable_share=0.33",
        "ssr-decision": f"{ssr} --train.decision_tokens=8 --train.decision_weight=3",
        "ssr-options": f"{ssr} --judge.prefix=true --judge.gold_answerable_share=0.33 "
        "--train.decision_tokens=8 --train.decision_weight=3",
        "ssr-gold3": f"{ssr} --train.loss_weight_gold=3",
        "ssr-f0.5": f"{ssr} --judge.min_f1=0.5",
        "ssr-f0.1": f"{ssr} --judge.min_f1=0.1",
        "ssr-llm-p0.15": "--config configs/experiment_ssr_llm.toml --judge.threshold=0.15",
    }
    assert {Path(k).name for k in train} == set(expected)
    for run_dir, cmd in train.items():
        assert (
            cmd == f"-m ssrengine.train {expected[Path(run_dir).name]} {SAVE} --run.dir={run_dir}"
        )
    # One shared generate, before every SSR training; every run evaluated against the base.
    gens = [i for i, c in enumerate(cmds) if c.startswith("-m ssrengine generate")]
    assert len(gens) == 1
    for i, c in enumerate(cmds):
        if "ssrengine.train" in c and "/ssr" in c:
            assert i > gens[0], c
    evals = [c for c in cmds if c.startswith("-m ssrengine eval ")]
    assert len(evals) == 1 + len(expected)
    assert all(f"--base-eval {exp}/base" in c for c in evals if "smollm2-135m" not in c)
    assert sum(c.startswith("-m ssrengine report") for c in cmds) == 2

    again = _commands(_make(exp, "experiment-options").stdout)  # finished work is kept
    assert again == [
        f"-m ssrengine report {exp}/base {exp}/sft {exp}/ssr "
        + " ".join(
            f"{exp}/{r}"
            for r in ("ssr-prefix", "ssr-balanced", "ssr-decision", "ssr-options", "ssr-gold3")
        )
        + f" --out {exp}/report-options"
    ]


def test_an_unknown_run_name_stops_with_its_name(tmp_path):
    res = _make(tmp_path / "exp", "experiment", "EXP_RUNS=sft ssr-nonsense")
    assert res.returncode == 2
    assert "unknown experiment run ssr-nonsense" in res.stderr


def test_tuning_trains_the_grid_on_validation_and_selects(tmp_path):
    exp = tmp_path / "exp"
    ckpt = exp / "tune" / "sft-e1-lr5e-5" / "checkpoints" / "step-31"
    ckpt.mkdir(parents=True)
    res = _make(exp, "experiment-tune", "TUNE_EPOCHS=1 3", "TUNE_LRS=5e-5 2e-4")
    assert res.returncode == 0, res.stderr
    # selected: the grid's checkpoints are deleted, its evals kept
    assert not ckpt.parent.exists() and (ckpt.parents[1] / "eval" / "eval.json").is_file()
    cmds = _commands(res.stdout)
    train = {c.rsplit("--run.dir=", 1)[1]: c for c in cmds if "ssrengine.train" in c}
    assert {Path(k).name for k in train} == {
        f"{arm}-e{e}-lr{lr}" for arm in ("sft", "ssr") for e in (1, 3) for lr in ("5e-5", "2e-4")
    }
    for run_dir, cmd in train.items():
        arm, rest = Path(run_dir).name.split("-e")
        epochs, lr = rest.split("-lr")
        flags = f"--train.epochs={epochs} --train.lr={lr}"
        assert cmd == f"-m ssrengine.train --config configs/experiment_{arm}.toml {flags} " + (
            f"{SAVE} --run.dir={run_dir}"
        )
    evals = [c for c in cmds if c.startswith("-m ssrengine eval ")]
    assert len(evals) == 8
    assert all(
        "--split in_domain=builtin:validation" in c and "--base-eval" not in c for c in evals
    )
    gens = [i for i, c in enumerate(cmds) if c.startswith("-m ssrengine generate")]
    assert len(gens) == 1
    for i, c in enumerate(cmds):
        if "ssrengine.train" in c and "/tune/ssr" in c:
            assert i > gens[0], c
    assert [line for line in res.stdout.splitlines() if "experiment.py select" in line] == [
        f"benchmarks/experiment.py select {exp}/tune"
    ]


def test_tuning_keeps_its_checkpoints_when_asked(tmp_path):
    exp = tmp_path / "exp"
    ckpt = exp / "tune" / "ssr-e1-lr5e-5" / "checkpoints" / "step-31"
    ckpt.mkdir(parents=True)
    res = _make(exp, "experiment-tune", "TUNE_EPOCHS=1", "TUNE_LRS=5e-5", "TUNE_KEEP=1")
    assert res.returncode == 0, res.stderr
    assert ckpt.is_dir()


def test_seeded_runs_train_each_arm_at_its_tuned_settings(tmp_path):
    exp = tmp_path / "exp"
    res = _make(
        exp, "experiment-seeds", "SEEDS=0 2", "ARMS=sft ssr ssr-ul ssr-contains",
        "TUNE_EPOCHS=1", "TUNE_LRS=1e-4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    train = {c.rsplit("--run.dir=", 1)[1]: c for c in cmds if "ssrengine.train" in c}
    seeded = {k: v for k, v in train.items() if "/seed" in k}
    assert {str(Path(k).relative_to(exp)) for k in seeded} == {
        f"seed{s}/{a}" for s in (0, 2) for a in ("sft", "ssr", "ssr-ul", "ssr-contains")
    }
    tuned = "--train.epochs=2 --train.lr=5e-5"  # what `experiment.py args` printed
    ssr = "--config configs/experiment_ssr.toml"
    for run_dir, cmd in seeded.items():
        seed, arm = Path(run_dir).parent.name.removeprefix("seed"), Path(run_dir).name
        head = {
            "sft": "--config configs/experiment_sft.toml",
            "ssr": ssr,
            "ssr-ul": f"{ssr} --train.unlikelihood_weight=1",
            "ssr-contains": f"{ssr} --judge.match=contains",
        }[arm]
        assert cmd == (
            f"-m ssrengine.train {head} {tuned} --train.seed={seed} {SAVE} --run.dir={run_dir}"
        )
    # the tuning grid and the selection come first; every seeded run is evaluated against base
    first_seeded = min(i for i, c in enumerate(cmds) if "/seed" in c and "ssrengine.train" in c)
    assert all(i < first_seeded for i, c in enumerate(cmds) if "/tune/" in c)
    evals = [c for c in cmds if c.startswith("-m ssrengine eval ") and "/seed" in c]
    assert len(evals) == 8 and all(f"--base-eval {exp}/base" in c for c in evals)
    tail = [line for line in res.stdout.splitlines() if line.startswith("benchmarks/experiment.py")]
    assert [t.split()[1] for t in tail] == ["select", "collect", "summary", "table"]
    assert "--write README.md docs/experiment.md" in tail[-1]
