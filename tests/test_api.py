"""The Python API, the example script, export --format trl and render, on the tiny model."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import ssrengine
from ssrengine.cli import main as cli_main
from ssrengine.core.config_load import config_from_json
from ssrengine.core.errors import InputError
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import SOURCES, RehearsalRow, RunDir
from ssrengine.data.records import prompt_messages, render_prompt
from tests.tiny import records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _example_main():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The example script run end to end on the tiny model."""
    tmp = tmp_path_factory.mktemp("api")
    data = write_jsonl(tmp / "train.jsonl", records(6))
    run = tmp / "run"
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--n", "6", "--steps", "1"]
    out = _example_main()([*argv, "--max-new-tokens", "4", "--run-dir", str(run)])
    return RunDir(run), out


def test_example_script_runs_every_stage_and_exports_trl(exported):
    rd, out = exported
    assert out == rd.export("trl") and (rd.checkpoints / "step-1").is_dir()
    cfg = config_from_json(rd.config)
    rows = [json.loads(x) for x in (out / "rehearsal.jsonl").read_text().splitlines()]
    built = list(read_typed(rd.rehearsal, RehearsalRow))
    assert [r["id"] for r in rows] == [r.id for r in built]
    for row, r in zip(rows, built):
        # TRL conversational prompt-completion: prompt = the messages, completion = [assistant]
        assert row["prompt"] == prompt_messages(r.messages, r.documents, cfg.data.system_prompt)
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert row["completion"] == [{"role": "assistant", "content": r.target}]
        assert row["source"] == r.source in SOURCES and row["answerable"] == r.answerable


def test_export_writes_a_datasets_directory_when_installed(exported):
    datasets = pytest.importorskip("datasets")  # optional: not a dependency of ssrengine
    _, out = exported
    ds = datasets.load_from_disk(str(out / "dataset"))
    jsonl = [json.loads(x) for x in (out / "rehearsal.jsonl").read_text().splitlines()]
    assert ds.column_names == ["id", "prompt", "completion", "source", "answerable"]
    assert ds.to_list() == jsonl


def test_export_refuses_an_edited_rehearsal_set(exported, tmp_path, capsys):
    rd, _ = exported
    assert cli_main(["export", str(rd.root), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "rehearsal.jsonl").is_file()
    original = rd.rehearsal.read_bytes()
    try:
        rows = [r.to_json() for r in read_typed(rd.rehearsal, RehearsalRow)]
        write_jsonl(rd.rehearsal, [{**rows[0], "target": "Edited."}, *rows[1:]])
        with pytest.raises(InputError, match="its rows changed"):
            ssrengine.export(rd.root, out=str(tmp_path / "bad"))
        capsys.readouterr()
        assert cli_main(["export", str(rd.root), "--out", str(tmp_path / "bad")]) == 2
        assert "run the build stage first" in capsys.readouterr().err
    finally:
        rd.rehearsal.write_bytes(original)
    assert not (tmp_path / "bad").exists()


def test_stage_functions_take_a_config(exported):
    rd, _ = exported
    cfg = config_from_json(rd.config)
    assert ssrengine.generate(cfg).keys() == ssrengine.judge(cfg).keys()
    stats = ssrengine.build(cfg)
    assert stats.overall.n == 6
    assert ssrengine.train(cfg) == rd.checkpoints / "step-1"  # finished: no work


def test_render_marks_exactly_the_supervised_span(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", records(3))
    args = [f"--model.path={tiny_model_dir}", f"--data.train_file={data}"]
    capsys.readouterr()
    assert cli_main(["render", *args, "--n", "2"]) == 0
    out = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = ssrengine.load_config(None, args)
    blocks = out.split("=== ")[1:]
    assert len(blocks) == 2
    for block, rec in zip(blocks, records(3)):
        head, text = block.split(" ===\n", 1)
        assert head.startswith(f"{rec['id']} ({data}:")
        prompt = render_prompt(
            tok, prompt_messages(rec["messages"], rec["documents"], cfg.data.system_prompt)
        )
        assert text.startswith(prompt + "⟦" + rec["response"])
        assert text.rstrip("\n").endswith("⟧") and text.count("⟦") == 1
    tokens = ssrengine.render(cfg, n=1, tokens=True)
    prompt_part, target_part = tokens.split("\n", 2)[1].rsplit("'\\n'(-100) ", 1)
    assert prompt_part.count("(-100)") == prompt_part.count("'(")  # every prompt token masked
    assert "(-100)" not in target_part and "'<|im_end|>'" in target_part
    capsys.readouterr()
    assert cli_main(["render", *args, "--n", "0"]) == 2  # 0 would otherwise mean "all"
    assert "field '--n'" in capsys.readouterr().err
