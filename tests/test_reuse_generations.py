"""``--reuse-generations OTHER_RUN``: another run's answers copied where model and prompts
match (ssrengine.rehearsal.reuse); refused in one line where nothing matches."""

from __future__ import annotations

import json

import pytest

from ssrengine.cli import main as cli_main
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import RunDir
from tests.tiny import records, write_jsonl


@pytest.fixture
def base(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    args = [f"--model.path={tiny_model_dir}", f"--data.train_file={data}"]
    args += ["--model.device=cpu", "--generation.max_new_tokens=4"]
    first = tmp_path / "first"
    assert cli_main(["generate", *args, f"--run.dir={first}"]) == 0
    return tmp_path, args, first


def _fails(capsys, argv):
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_matching_generations_are_reused_not_regenerated(base, monkeypatch):
    tmp_path, args, first = base
    second = tmp_path / "second"
    import ssrengine.rehearsal.stages as stages

    argv = ["generate", *args, f"--run.dir={second}", f"--reuse-generations={first}"]
    calls = []
    real = stages.generate_rows

    def counting(cfg, run_dir, examples, gen, sample=0):
        out = real(cfg, run_dir, examples, gen, sample=sample)
        calls.append(gen._gen)  # None: the lazy generator never opened a model
        return out

    monkeypatch.setattr(stages, "generate_rows", counting)
    assert cli_main(argv) == 0
    assert calls == [None]

    def rows(d):
        return sorted(json.dumps(r, sort_keys=True) for r in read_rows(RunDir(d).generations))

    assert rows(second) == rows(first) and len(rows(first)) == 6
    # Again: nothing is copied twice.
    assert cli_main(argv) == 0
    assert len(rows(second)) == 6


def test_other_prompts_or_model_are_refused_in_one_line(base, capsys, tmp_path):
    tmp_path, args, first = base
    other = ["--data.system_prompt=Be brief.", f"--run.dir={tmp_path / 'x'}"]
    err = _fails(capsys, ["generate", *args, *other, f"--reuse-generations={first}"])
    assert "generations.jsonl" in err and "same model" in err and "other prompts" in err
    err = _fails(capsys, ["run", *args, f"--run.dir={tmp_path / 'y'}", "--reuse-generations=nope"])
    assert "nope/generations.jsonl" in err and "run that run's generate stage first" in err
