"""Data validated and fitted to data.max_seq_len once, before generate: every stage sees the
same prompt, an over-long record is named by its input file and line, skips are not counted."""

import pytest
from transformers import AutoTokenizer

from ssrengine.cli import main as cli_main
from ssrengine.core.config_load import load_config
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import BuildStats, GenerationRow, RehearsalRow, RunDir
from ssrengine.data.records import encode_prompt, prompt_messages
from ssrengine.rehearsal.prepare import prepare, train_examples
from ssrengine.rehearsal.stages import generation_keys, open_generator
from ssrengine.training.batching import encode_rows
from tests.tiny import records, write_jsonl

LONG = {"title": "Filler", "text": "word " * 400}


@pytest.fixture
def long_run(tiny_model_dir, tmp_path):
    recs = records(6)
    recs[1]["documents"] = [*recs[1]["documents"], LONG]  # line 2 of the file
    data = write_jsonl(tmp_path / "train.jsonl", recs)
    args = [
        f"--model.path={tiny_model_dir}",
        f"--data.train_file={data}",
        f"--run.dir={tmp_path / 'run'}",
        "--model.device=cpu",
        "--data.max_seq_len=256",
        "--generation.max_new_tokens=4",
        "--train.max_steps=1",
        "--train.max_tokens=512",
    ]
    return data, RunDir(tmp_path / "run"), args


def test_trimmed_prompt_is_the_one_generated_judged_built_and_trained(long_run):
    _, rd, args = long_run
    args = [*args, "--data.on_overlong=trim_documents"]
    assert cli_main(["run", *args]) == 0
    cfg = load_config(None, args)
    fitted = {e.id: e for e in prepare(cfg)}
    raw = {e.id: e for e in train_examples(cfg)}
    assert fitted["ex-001"].documents == raw["ex-001"].documents[:-1]

    # generate: the key of each row is that of the fitted prompt, not the raw one.
    gen = open_generator(cfg)
    want = generation_keys(cfg, list(fitted.values()), gen)
    untrimmed = generation_keys(cfg, [raw["ex-001"]], gen)["ex-001"]
    rows = {r.id: r for r in read_typed(rd.generations, GenerationRow)}
    assert {i: r.key() for i, r in rows.items()} == want and untrimmed != want["ex-001"]
    # build: the rehearsal row carries the fitted documents ...
    rehearsal = {r.id: r for r in read_typed(rd.rehearsal, RehearsalRow)}
    assert rehearsal["ex-001"].documents == fitted["ex-001"].documents
    # ... and train tokenizes exactly the prompt the model answered.
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    encoded = {e.id: e for e in encode_rows(list(rehearsal.values()), tok, cfg.data)}
    e = fitted["ex-001"]
    prompt = encode_prompt(tok, prompt_messages(e.messages, e.documents, cfg.data.system_prompt))
    assert encoded["ex-001"].input_ids[: len(prompt)] == prompt


def test_overlong_record_stops_before_generate_naming_the_input_line(long_run, capsys):
    data, rd, args = long_run
    capsys.readouterr()
    assert cli_main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:2: field 'documents'" in err and "data.max_seq_len=256" in err, err
    # Nothing generated first: at most the run-dir lock was taken.
    assert not rd.root.exists() or {p.name for p in rd.root.iterdir()} <= {".lock"}


def test_skipped_records_are_left_out_of_every_stage_and_the_counts(long_run):
    _, rd, args = long_run
    assert cli_main(["run", *args, "--data.on_overlong=skip"]) == 0
    assert len(list(read_typed(rd.generations, GenerationRow))) == 5
    ids = [r.id for r in read_typed(rd.rehearsal, RehearsalRow)]
    assert "ex-001" not in ids and len(ids) == 5
    assert BuildStats.read(rd.build_stats).overall.n == 5
