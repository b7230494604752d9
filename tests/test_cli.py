"""The command line: help, version, did-you-mean, bare booleans, delegated subcommands."""

import json
import subprocess
import sys

import pytest

from ssrengine.cli import main
from ssrengine.core.config_load import load_config


def test_bare_boolean_overrides():
    cfg = load_config(None, ["--train.lora", "--no-train.packing", "--train.max_steps", "3"])
    assert cfg.train.lora is True and cfg.train.packing is False and cfg.train.max_steps == 3
    cfg = load_config(None, ["--train.lora", "false", "--train.gradient_checkpointing"])
    assert cfg.train.lora is False and cfg.train.gradient_checkpointing is True
    assert load_config(None, ["--train.lora=false"]).train.lora is False


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["trian"], "unknown command 'trian' (did you mean 'train'?)"),
        (["run", "--lora"], "unknown option --lora (did you mean '--train.lora'?)"),
        (["config", "--markdwn"], "unknown option --markdwn (did you mean '--markdown'?)"),
        (["config", "--no-train.lora=1"], "--no-train.lora takes no value"),
    ],
)
def test_mistyped_flag_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err


def test_help_shows_overrides_and_config_table(capsys):
    for command in ("run", "train", "eval", "render", "config"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--section.field=value" in out and "config --markdown" in out, command


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("python -m ssrengine 0.")


def test_train_module_names_itself():
    out = subprocess.run(
        [sys.executable, "-m", "ssrengine.train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.startswith("usage: python -m ssrengine.train ")
    assert "--section.field=value" in out.stdout


def test_datasets_and_models_are_subcommands(tmp_path, capsys):
    out = tmp_path / "v.jsonl"
    assert main(["datasets", "builtin", "validation", "--out", str(out)]) == 0
    assert all("id" in json.loads(line) for line in out.read_text().splitlines())
    with pytest.raises(SystemExit) as e:
        main(["models", "fetch", "--help"])
    assert e.value.code == 0 and "smollm2-135m" in capsys.readouterr().out


def test_missing_tracker_stops_run_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trackio", None)  # find_spec: None, as when not installed
    argv = ["run", f"--run.dir={tmp_path / 'r'}", "--train.report_to=trackio"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.report_to" in err and "needs the trackio package" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()
