"""Training callbacks (ssrengine.training.callbacks): every event with what it promises, from
the config (`train.callbacks = ["python:MODULE:NAME"]`), the Python API and `registered`; plain
progress lines when stderr is not a terminal; the package's public names."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import ssrengine
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.training.callbacks import Callbacks, registered
from ssrengine.training.trainer import train
from tests.test_trainer import rehearsal
from tests.tiny import records, write_jsonl

RECORDER = '''
class Recorder:
    """Keeps every event, in order, on the class (the trainer builds the instance)."""

    events = []

    def on_step_end(self, row):
        Recorder.events.append(("step", row.step, row.loss))

    def on_evaluate(self, step, results):
        Recorder.events.append(("eval", step, results["eval_loss"]))

    def on_checkpoint(self, path):
        Recorder.events.append(("checkpoint", path.name))

    def on_train_end(self, final):
        Recorder.events.append(("end", final and final.name))
'''


class StepsOnly:
    """A callback with one method: the others are skipped."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, row) -> None:
        self.steps.append(row.step)


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "rehearsal.jsonl", [r.to_json() for r in rehearsal(10)])
    return run


def _cfg(model: Path, run: Path, *extra: str):
    args = [f"--model.path={model}", f"--run.dir={run}", "--train.loss_impl=naive"]
    args += ["--train.micro_batch_size=2", "--no-train.packing", "--train.lr=1e-3"]
    return load_config(None, [*args, *extra])


@pytest.fixture
def recorder_module(tmp_path, monkeypatch):
    (tmp_path / "mycallbacks.py").write_text(RECORDER)
    monkeypatch.chdir(tmp_path)  # MODULE is imported from the current directory
    yield
    sys.modules.pop("mycallbacks", None)


def test_every_event_from_a_config_callback(tiny_model_dir, tmp_path, recorder_module):
    run = _run(tmp_path)
    mine = StepsOnly()
    cfg = _cfg(
        tiny_model_dir,
        run,
        "--train.max_steps=4",
        "--train.save_every=2",
        "--train.eval_every=2",
        "--data.eval_fraction=0.2",
        "--train.callbacks=python:mycallbacks:Recorder",
    )
    final = train(cfg, run, callbacks=[mine])
    import mycallbacks

    events = mycallbacks.Recorder.events
    rows = list(read_rows(run / "metrics.jsonl"))
    # Step ends carry the rows written to metrics.jsonl.
    assert [e[1:] for e in events if e[0] == "step"] == [(r["step"], r["loss"]) for r in rows]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    got = [e[1:] for e in events if e[0] == "eval"]
    assert [g[0] for g in got] == [v[0] for v in evals] == [2, 4]
    assert [g[1] for g in got] == pytest.approx([v[1] for v in evals], abs=1e-6)
    assert [e[1] for e in events if e[0] == "checkpoint"] == ["step-2", "step-4"]
    assert events[-1] == ("end", final.name) == ("end", "step-4")
    # The order of one step: its row, its evaluation, its checkpoint.
    i = events.index(("checkpoint", "step-2"))
    assert events[i - 2][:2] == ("step", 2) and events[i - 1][:2] == ("eval", 2)
    assert mine.steps == [1, 2, 3, 4]  # the caller's callback, with only on_step_end


def test_api_callbacks_reach_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    run = _run(tmp_path)
    outer, inner = StepsOnly(), StepsOnly()
    with registered([outer]):
        train(_cfg(tiny_model_dir, run, "--train.max_steps=2"), run, callbacks=[inner])
    assert outer.steps == inner.steps == [1, 2]
    # ssrengine.train / ssrengine.run take them the same way, through the whole pipeline.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    api = StepsOnly()
    config = {
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train_file": str(data)},
        "train": {"max_steps": 3},
        "run": {"dir": str(tmp_path / "api"), "mode": "sft"},
    }
    assert ssrengine.run(config, callbacks=[api]).name == "step-3"
    assert api.steps == [1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mycallbacks:Recorder", "expected python:MODULE:NAME"),
        ("python:nosuchmodule:X", "cannot import module 'nosuchmodule'"),
        ("python:mycallbacks:Nope", "module 'mycallbacks' has no 'Nope'"),
        ("python:os:sep", "not a training callback: it has none of on_step_end"),
    ],
)
def test_a_bad_callback_is_one_line_before_training(
    tiny_model_dir, tmp_path, recorder_module, spec, message
):
    run = _run(tmp_path)
    with pytest.raises(InputError, match=message) as e:
        train(_cfg(tiny_model_dir, run, "--train.max_steps=2", f"--train.callbacks={spec}"), run)
    assert "train.callbacks" in str(e.value) and "\n" not in str(e.value)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    with pytest.raises(InputError, match="is not a training callback"):
        Callbacks([object()])


def test_callbacks_are_never_read_from_a_run_directory(tmp_path, caplog):
    from ssrengine.core.config_load import saved_config

    cfg = load_config(None, ["--train.callbacks=python:mycallbacks:Recorder"])
    cfg.save(tmp_path / "config.json")
    assert saved_config(tmp_path / "config.json").train.callbacks == ()
    assert "ignoring train.callbacks" in caplog.text


def test_piped_stderr_gets_plain_progress_lines(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="ssrengine")
    run = _run(tmp_path)
    assert not sys.stderr.isatty()  # pytest's capture, as a pipe or a log file would be
    train(_cfg(tiny_model_dir, run, "--train.max_steps=5", "--train.log_every=2"), run)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split(":")[0] for m in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert all("loss" in m and "tokens/s" in m and "left" in m for m in lines)
    assert "\r" not in capsys.readouterr().err  # no progress bar redrawn in place


def test_resume_log_says_one_rank(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ssrengine")
    run = _run(tmp_path)
    train(_cfg(tiny_model_dir, run, "--train.max_steps=1"), run)
    train(_cfg(tiny_model_dir, run, "--train.max_steps=2"), run)
    assert "(step 1, 1 rank)" in caplog.text and "1 ranks" not in caplog.text


def test_the_package_shows_its_api_only():
    names = set(dir(ssrengine))
    assert {"os", "sys", "Path", "Any", "Mapping", "types", "build_config"}.isdisjoint(names)
    assert set(ssrengine.__all__) <= names and {"run", "train", "Callback"} <= names
    namespace: dict = {}
    exec("from ssrengine import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(ssrengine.__all__)
