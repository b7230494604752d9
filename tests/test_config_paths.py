"""Relative paths in a config file resolve from the file's folder (ssrengine.core.config_paths)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ssrengine.core.config_load import load_config


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """project/configs/c.toml beside project/configs/data/train.jsonl; the command runs
    elsewhere (tmp_path/elsewhere)."""
    configs = tmp_path / "project" / "configs"
    (configs / "data").mkdir(parents=True)
    (configs / "data" / "train.jsonl").write_text("{}\n")
    (configs / "rubric.txt").write_text("Answer Yes or No.\n")
    (tmp_path / "project" / "model").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return configs


def test_file_paths_resolve_from_the_config_folder(project):
    (project / "c.toml").write_text(
        '[data]\ntrain_file = "data/train.jsonl"\neval_file = "builtin:validation"\n'
        '[judge]\nrubric = "rubric.txt"\n[model]\npath = "../model"\n'
        '[run]\ndir = "runs/x"\n'
    )
    cfg = load_config(project / "c.toml")
    assert cfg.data.train_file == str(project / "data" / "train.jsonl")
    assert cfg.judge.rubric == str(project / "rubric.txt")
    assert Path(cfg.model.path) == (project / ".." / "model")
    assert cfg.data.eval_file == "builtin:validation"  # not a path
    assert cfg.run.dir == "runs/x"  # the output stays relative to the working directory


def test_names_text_and_command_line_values_are_left_alone(project):
    (project / "c.toml").write_text(
        '[model]\npath = "smollm2-135m"\nchat_template = "{{ messages }}"\n'
    )
    cfg = load_config(project / "c.toml", ["--data.train_file=data/train.jsonl"])
    assert cfg.model.path == "smollm2-135m" and cfg.model.chat_template == "{{ messages }}"
    assert cfg.data.train_file == "data/train.jsonl"  # the shell's working directory


def test_a_missing_file_is_named_where_it_was_looked_for(project):
    (project / "c.toml").write_text('[data]\ntrain_file = "nope.jsonl"\n')
    assert load_config(project / "c.toml").data.train_file == str(project / "nope.jsonl")


def test_a_file_only_the_working_directory_has_is_kept_with_a_warning(project, caplog):
    Path("mine.jsonl").write_text("{}\n")  # in the working directory, not the config's folder
    (project / "c.toml").write_text('[data]\ntrain_file = "mine.jsonl"\n')
    with caplog.at_level(logging.WARNING):
        cfg = load_config(project / "c.toml")
    assert cfg.data.train_file == "mine.jsonl"
    assert "resolve from its folder" in caplog.text and "../../elsewhere/mine.jsonl" in caplog.text
