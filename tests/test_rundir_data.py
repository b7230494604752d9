"""A run directory is data, not code: a saved config.json that asks to run code (a model's own
modeling code, another Python, a python: judge) is not obeyed when a run is evaluated or
exported; files are never written through a symbolic link; a number that is not finite is
never written (rows refuse it, eval files hold null); checkpoints are checked against the
SHA-256 of every file recorded at save before they are evaluated."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest

from ssrengine.cli import main as cli_main
from ssrengine.core.config_load import config_from_json, load_config
from ssrengine.core.errors import InputError
from ssrengine.core.eval_rows import EvalResult
from ssrengine.core.io import RowWriter, atomic_write_text, open_append, read_rows
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import VerdictRow
from ssrengine.core.runlock import lock_run_dir
from ssrengine.data.records import load_examples
from ssrengine.evaluation.evaluate import resolve_target
from ssrengine.models.loading import load_model
from ssrengine.rehearsal.judge import Verdict
from ssrengine.rehearsal.stages import judge_rows
from ssrengine.training.trainer import train
from tests.tiny import records, write_jsonl

EVAL_ARGS = ["--limit", "4", "--probe-limit", "2", "--mc-limit", "2", "--lm-eval", "off"]
FAST = ["--generation.max_new_tokens=4", "--generation.batch_size=4"]
CODE = {
    "model": {"trust_remote_code": True},
    "generation": {"launch_python": "/tmp/not-your-python"},
    "judge": {"kind": "python:evil_judge:judge"},
}


def _reject_nan(name: str) -> float:
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str) -> object:
    """json.loads as jq reads: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=_reject_nan)


def _evil_run(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """A run dir someone left on shared storage: its checkpoint ships modeling code that writes
    a marker file when imported, and its config.json asks for every code setting."""
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-1"
    shutil.copytree(model, ckpt)
    (ckpt / "evil_model.py").write_text(
        "import pathlib\nfrom transformers import LlamaForCausalLM\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    cfg = load_config(None, [f"--model.path={model}", f"--run.dir={run}"]).to_dict()
    for sec, values in CODE.items():
        cfg[sec].update(values)
    (run / "config.json").write_text(json.dumps(cfg))
    return run, marker


def test_eval_of_a_run_dir_never_runs_code_it_names(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    run, marker = _evil_run(tmp_path, tiny_model_dir)
    test = write_jsonl(tmp_path / "test.jsonl", records(4))
    assert cli_main(["eval", str(run), "--split", f"x={test}", *EVAL_ARGS, *FAST]) == 0
    assert not marker.exists()
    for key in ("model.trust_remote_code", "generation.launch_python", "judge.kind"):
        assert f"{run}/config.json: ignoring {key} = " in caplog.text
    saved = strict_json((run / "eval" / "eval.json").read_text())["config"]
    assert saved["model"]["trust_remote_code"] is False
    assert saved["generation"]["launch_python"] == "" and saved["judge"]["kind"] == "rule"
    # The user's own command line still decides: the flag is honoured from there ...
    t = resolve_target(str(run), overrides=["--model.trust_remote_code=true"])
    assert t.cfg.model.trust_remote_code is True
    # ... and the marker is a real witness: loading with the code allowed runs it.
    load_model(t.model, device="cpu", trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_export_reads_a_run_config_without_its_code_settings(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    run, _ = _evil_run(tmp_path, tiny_model_dir)
    cfg = config_from_json(run / "config.json")
    assert not cfg.model.trust_remote_code
    assert cfg.generation.launch_python == "" and cfg.judge.kind == "rule"
    assert caplog.text.count("settings that run code are taken only from your own") == 3


def accept_all(example, candidate) -> bool:
    """A user's own judge (judge.kind = "python:tests.test_rundir_data:accept_all")."""
    return True


def test_export_of_a_run_judged_by_python_code_still_checks_and_exports(tiny_model_dir, tmp_path):
    from ssrengine.core.config_load import drop_code_settings
    from ssrengine.export import export
    from ssrengine.pipeline import run_stage

    data = write_jsonl(tmp_path / "d.jsonl", records(3))
    cfg = load_config(
        None,
        [
            f"--model.path={tiny_model_dir}",
            f"--data.train_file={data}",
            f"--run.dir={tmp_path / 'run'}",
            "--judge.kind=python:tests.test_rundir_data:accept_all",
            "--generation.max_new_tokens=4",
        ],
    )
    for stage in ("generate", "judge", "build"):
        run_stage(cfg, stage)
    # The judge's name is compared as recorded (data); nothing of it is run or warned about.
    out = export(tmp_path / "run")
    assert len((out / "rehearsal.jsonl").read_text().splitlines()) == 3
    # A setting spelled as text is still a setting: "yes" would parse as true.
    raw = {"model": {"trust_remote_code": "yes"}, "train": {"callbacks": ["python:m:f"]}}
    assert drop_code_settings(raw, "x") == {"model": {}, "train": {}}


# ------------------------------------------------------------------------- symbolic links
def test_no_writer_follows_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("rows.jsonl", "metrics.jsonl"):
        (run / name).symlink_to(victim)
    with pytest.raises(InputError, match=r"rows\.jsonl: is a symbolic link"):
        RowWriter(run / "rows.jsonl")
    with pytest.raises(InputError, match=r"metrics\.jsonl: is a symbolic link"):
        open_append(run / "metrics.jsonl")
    # An atomic write's temp name planted as a link: the link goes, the file is written.
    (run / f".x.json.tmp{os.getpid()}").symlink_to(victim)
    atomic_write_text(run / "x.json", "{}\n")
    assert (run / "x.json").read_text() == "{}\n" and not (run / "x.json").is_symlink()
    # The final name a link: replaced by the file, the link's target untouched.
    (run / "y.json").symlink_to(victim)
    atomic_write_text(run / "y.json", "{}\n")
    assert not (run / "y.json").is_symlink()
    assert victim.read_text() == "precious\n"


def test_a_planted_lock_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(InputError, match=r"run/\.lock: is a symbolic link"), lock_run_dir(run):
        pass
    assert victim.read_text() == "precious\n" and (run / ".lock").is_symlink()


def test_a_refused_command_in_a_new_run_dir_leaves_no_directory(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(InputError, match="refused"), lock_run_dir(run):
        assert (run / ".lock").is_file()
        raise InputError("refused")
    assert not run.exists()
    run.mkdir(parents=True)
    (run / ".lock").write_text("4242\n")
    with pytest.raises(InputError), lock_run_dir(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        raise InputError("refused")
    assert (run / ".lock").read_text() == "4242\n"  # the old content, byte for byte


# ----------------------------------------------------------------------- never a NaN
def test_a_nan_verdict_is_never_stored(tiny_model_dir, tmp_path):
    class NaNJudge:
        name = "nan-judge"

        def judge_batch(self, examples, candidates):
            return [Verdict(True, 1.0 if e.id == "ex-000" else math.nan, "") for e in examples]

    data = write_jsonl(tmp_path / "d.jsonl", records(3))
    exs = load_examples(data)
    cfg = load_config(None, [f"--model.path={tiny_model_dir}", "--judge.batch_size=1"])
    with pytest.raises(InputError) as e:
        judge_rows(cfg, tmp_path, exs, {x.id: "Founded in 1901." for x in exs}, NaNJudge())
    assert "judge nan-judge gave 'ex-001' the score nan, not a finite number" in str(e.value)
    assert [r["id"] for r in read_rows(tmp_path / "verdicts.jsonl")] == ["ex-000"]
    strict_json((tmp_path / "verdicts.jsonl").read_text().strip())
    # The last line of defence: a row writer refuses a NaN whatever wrote it ...
    with RowWriter(tmp_path / "r.jsonl") as w, pytest.raises(InputError, match="'score'"):
        w.write({"id": "a", "score": math.nan})
    assert (tmp_path / "r.jsonl").read_bytes() == b""
    # ... and a NaN verdict an older version wrote is never reused.
    (tmp_path / "old.jsonl").write_text(
        '{"id": "a", "accept": true, "score": NaN, "reason": "", "judge": "j", "input_hash": "h"}\n'
    )
    with pytest.raises(InputError, match=r"old\.jsonl:1: field 'score': not a finite number"):
        list(read_typed(tmp_path / "old.jsonl", VerdictRow))


def test_eval_json_is_strict_json_with_null_where_undefined(tiny_model_dir, tmp_path):
    # Only answerable questions: the accuracy on unanswerable ones and the decision AUC over
    # the two classes are undefined.
    rows = [r for r in records(9) if r["answerable"]]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "base"
    argv = ["eval", str(tiny_model_dir), "--out", str(out), "--split", f"x={test}"]
    assert cli_main(argv + EVAL_ARGS + FAST) == 0
    text = (out / "eval" / "eval.json").read_text()
    paper = strict_json(text)["splits"]["x"]["paper"]
    assert paper["unanswerable_acc"]["value"] is None
    for f in (out / "eval").glob("*.json*"):
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            strict_json(line)
    # Read back, null is NaN again: the report's arithmetic and its "–" cells are unchanged.
    back = EvalResult.read(out / "eval" / "eval.json")
    assert math.isnan(back.splits["x"].paper["unanswerable_acc"]["value"])


# ---------------------------------------------------------------- checkpoint checksums
def test_eval_falls_back_to_the_newest_undamaged_checkpoint(tiny_model_dir, tmp_path, caplog):
    from tests.test_trainer import rehearsal

    caplog.set_level(logging.WARNING)
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "rehearsal.jsonl", [r.to_json() for r in rehearsal(4)])
    args = [f"--model.path={tiny_model_dir}", f"--run.dir={run}", "--train.max_steps=2"]
    cfg = load_config(None, [*args, "--train.save_every=1", "--train.micro_batch_size=2"])
    train(cfg, run)
    cfg.save(run / "config.json")
    weights = run / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # same size, valid header
    weights.write_bytes(bytes(data))
    t = resolve_target(str(run))
    assert t.model == str(run / "checkpoints" / "step-1")
    assert f"damaged checkpoint, not evaluated: {weights}: contents differ" in caplog.text
