"""Every stage boundary on the tiny model: a changed upstream input is redone or refused, never
mixed into a downstream output (generate → judge → build → train)."""

import json
import shutil

import pytest

from ssrengine.cli import main as cli_main
from ssrengine.core.provenance import read_provenance
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import GenerationRow, RehearsalRow, RunDir
from tests.tiny import records, write_jsonl


@pytest.fixture
def run_args(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    run = tmp_path / "run"
    args = [
        f"--model.path={tiny_model_dir}",
        f"--data.train_file={data}",
        f"--run.dir={run}",
        "--model.device=cpu",
        "--generation.max_new_tokens=4",
        "--train.max_steps=1",
    ]
    return RunDir(run), args


def _snapshot(rd: RunDir) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in (rd.config, rd.rehearsal, rd.build_stats, rd.provenance, rd.metrics)
    }


def _fails(capsys, argv: list[str]) -> str:
    """The one-line error of a command that must exit with status 2."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_changed_judge_refuses_a_finished_run_and_changes_nothing(run_args, capsys):
    rd, args = run_args
    assert cli_main(["run", *args]) == 0
    before = _snapshot(rd)
    assert read_provenance(rd)["train"].config["judge.min_f1"] == 0.3

    err = _fails(capsys, ["run", *args, "--judge.min_f1=0.0"])
    assert "checkpoints" in err and "judge.min_f1: 0.3 -> 0.0" in err and "new run.dir" in err
    assert _snapshot(rd) == before  # config.json, rehearsal, stats, records: untouched
    # A single stage is refused the same way.
    assert "judge.min_f1: 0.3 -> 0.0" in _fails(capsys, ["build", *args, "--judge.min_f1=0.0"])
    assert _snapshot(rd) == before

    # Settings that change no output (checkpoint cadence) keep the finished run.
    assert cli_main(["run", *args, "--train.save_every=5"]) == 0
    # Following the hint retrains under the new judge.
    shutil.rmtree(rd.checkpoints)
    rd.metrics.unlink()
    assert cli_main(["run", *args, "--judge.min_f1=0.0"]) == 0
    train = read_provenance(rd)["train"]
    assert train.config["judge.min_f1"] == 0.0 and (rd.checkpoints / "step-1").is_dir()


def test_generate_to_judge_reads_only_generations_of_the_current_settings(run_args, capsys):
    rd, args = run_args
    assert cli_main(["generate", *args]) == 0
    err = _fails(capsys, ["judge", *args, "--generation.max_new_tokens=3"])
    assert "generations.jsonl" in err and "run the generate stage again" in err
    assert not rd.verdicts.exists()

    assert cli_main(["generate", *args, "--generation.max_new_tokens=3"]) == 0
    assert cli_main(["judge", *args, "--generation.max_new_tokens=3"]) == 0
    # Back to 4 tokens: the first rows are current again although the 3-token rows came later.
    assert cli_main(["judge", *args]) == 0
    gens = list(read_typed(rd.generations, GenerationRow))
    assert len(gens) == 12
    first = {g.id: g.prompt_hash for g in gens[:6]}
    judged = read_provenance(rd)["judge"]
    assert judged.config["generation.max_new_tokens"] == 4
    from ssrengine.pipeline import rows_hash

    assert judged.inputs == rows_hash(g for g in gens if first.get(g.id) == g.prompt_hash)


def test_judge_to_build_reads_only_verdicts_of_the_configured_judge(run_args, capsys):
    rd, args = run_args
    assert cli_main(["generate", *args]) == 0
    assert cli_main(["judge", *args]) == 0
    err = _fails(capsys, ["build", *args, "--judge.min_f1=0.0"])
    assert "verdicts.jsonl" in err and "run the judge stage again" in err
    assert not rd.rehearsal.exists()
    assert cli_main(["judge", *args, "--judge.min_f1=0.0"]) == 0
    assert cli_main(["build", *args, "--judge.min_f1=0.0"]) == 0
    assert read_provenance(rd)["build"].config["judge.min_f1"] == 0.0


def test_build_to_train_refuses_a_stale_or_edited_rehearsal_set(run_args, capsys):
    rd, args = run_args
    for stage in ("generate", "judge", "build"):
        assert cli_main([stage, *args]) == 0
    # The judge changed, build was not rerun: rehearsal.jsonl is the old judge's.
    assert cli_main(["judge", *args, "--judge.min_f1=0.0"]) == 0
    err = _fails(capsys, ["train", *args, "--judge.min_f1=0.0"])
    assert "rehearsal.jsonl" in err and "judge.min_f1: 0.3 -> 0.0" in err and "build" in err
    assert not rd.checkpoints.exists()

    # Edited by hand after build.
    rows = list(read_typed(rd.rehearsal, RehearsalRow))
    edited = [{**rows[0].to_json(), "target": "Something else."}, *(r.to_json() for r in rows[1:])]
    write_jsonl(rd.rehearsal, edited)
    assert "its rows changed" in _fails(capsys, ["train", *args])
    assert not rd.checkpoints.exists()

    assert cli_main(["build", *args]) == 0
    assert cli_main(["train", *args]) == 0
    rec = read_provenance(rd)
    assert rec["train"].inputs == rec["build"].output


def test_resume_without_a_checkpoint_fails_before_any_stage(run_args, capsys):
    rd, args = run_args
    assert "--resume" in _fails(capsys, ["run", *args, "--resume"])
    # Nothing generated, judged or built first: at most the run-dir lock was taken.
    assert not rd.root.exists() or {p.name for p in rd.root.iterdir()} <= {".lock"}


def test_records_name_the_config_and_inputs_of_each_stage(run_args):
    rd, args = run_args
    assert cli_main(["run", *args]) == 0
    rec = read_provenance(rd)
    assert list(rec) == ["generate", "judge", "build", "train"]
    assert "judge.min_f1" not in rec["generate"].config  # only what the stage depends on
    assert "train.lr" in rec["train"].config and "train.save_every" not in rec["train"].config
    saved = json.loads(rd.provenance.read_text())
    assert saved["build"]["output"] == rec["train"].inputs


def test_own_rehearsal_set_trains_as_given_and_is_then_pinned(run_args, capsys):
    """A rehearsal.jsonl the build stage did not write is the user's input: training records
    it, and a later edit is refused like any changed input under a checkpoint."""
    rd, args = run_args
    rd.root.mkdir()
    rows = [
        RehearsalRow(f"r{i}", [{"role": "user", "content": "Who?"}], [], "Acme.", "gold")
        for i in range(4)
    ]
    write_jsonl(rd.rehearsal, [r.to_json() for r in rows])
    assert cli_main(["train", *args]) == 0
    write_jsonl(
        rd.rehearsal, [{**rows[0].to_json(), "target": "Edited."}, *(r.to_json() for r in rows[1:])]
    )
    assert "trained on another rehearsal set" in _fails(capsys, ["train", *args])


def test_unreadable_provenance_is_one_line(run_args, capsys):
    rd, args = run_args
    assert cli_main(["run", *args]) == 0
    rd.provenance.write_text("{")
    err = _fails(capsys, ["run", *args])
    assert "provenance.json:1: not valid JSON" in err
    rd.provenance.write_text('{"train": {"stage": "train", "config": {}}}')
    assert "provenance.json: field 'train.inputs': missing" in _fails(capsys, ["run", *args])


def test_fields_of_another_version_are_not_changes():
    """A record written before a config field existed (or was counted) refuses nothing."""
    from ssrengine.core.provenance import config_changes

    old = {"train.lr": 1e-4, "train.loss_impl": "auto"}
    assert config_changes(old, {"train.lr": 1e-4, "train.epochs": 0}) == []
    assert config_changes(old, {"train.lr": 2e-4}) == ["train.lr: 0.0001 -> 0.0002"]
