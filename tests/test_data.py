import dataclasses
import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from ssrengine import IGNORE_INDEX
from ssrengine.core.config import DataConfig
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import RehearsalRow
from ssrengine.data.records import encode, load_examples, prompt_messages, render_prompt
from ssrengine.models.fetch import resolve_model_path
from ssrengine.training.batching import encode_rows
from tests.tiny import records, write_jsonl


def _masking_holds(tok, messages, target):
    ids, labels = encode(tok, messages, target)
    assert len(ids) == len(labels)
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    # Every prompt token is ignored; everything after it is supervised and equals the input.
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    # The boundary is exactly the chat template's generation prompt.
    assert tok.decode(ids[:n_prompt]) == render_prompt(tok, messages)
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": target}], tokenize=False
    )
    assert tok.decode(ids) == full
    assert tok.decode(ids[n_prompt:]).startswith(target)


@pytest.mark.parametrize("rec", records(6), ids=lambda r: r["id"])
def test_target_masking_matches_chat_template_tiny(tiny_model_dir, rec):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _masking_holds(
        tok,
        prompt_messages(rec["messages"], rec["documents"], "Use the documents."),
        rec["response"],
    )


def test_target_masking_matches_chat_template_smollm2(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for rec in records(4):
        _masking_holds(
            tok,
            prompt_messages(rec["messages"], rec["documents"], "Use the documents."),
            rec["response"],
        )


def _one_bad(tmp_path, mutate):
    rows = records(3)
    mutate(rows)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.mark.parametrize(
    ("mutate", "line", "field", "needle"),
    [
        (
            lambda r: r[1].pop("response"),
            2,
            "messages[2].role",
            "must be the assistant's gold answer",
        ),
        (lambda r: r[2].update(response="   "), 3, "response", "empty response"),
        (
            lambda r: r[1]["messages"][0].update(role="bot"),
            2,
            "messages[0].role",
            "unknown role 'bot'",
        ),
        (lambda r: r[0].update(id=" "), 1, "id", "empty or not a string"),
        (lambda r: r[0].update(id=[1]), 1, "id", "empty or not a string"),
        (lambda r: r[2].update(id=r[0]["id"]), 3, "id", "duplicate id 'ex-000' (first on line 1)"),
        (lambda r: r[0].update(messages=[]), 1, "messages", "missing or empty"),
        (lambda r: r[1].update(documents=[{"title": "t"}]), 2, "documents[0]", "string 'text'"),
        (lambda r: r[1].update(answerable="yes"), 2, "answerable", "expected true/false"),
        (
            lambda r: r[0]["messages"].append({"role": "assistant", "content": "x"}),
            1,
            "messages[1].role",
            "last message",
        ),
    ],
)
def test_bad_record_names_file_line_field(tmp_path, mutate, line, field, needle):
    path = _one_bad(tmp_path, mutate)
    with pytest.raises(InputError) as e:
        load_examples(path)
    msg = str(e.value)
    assert f"{path}:{line}: field '{field}'" in msg and needle in msg, msg


def test_malformed_json_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(records(1)[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=rf"{path}:2: malformed JSON"):
        load_examples(path)


def test_skip_policy_counts_and_keeps_good_rows(tmp_path, caplog):
    path = _one_bad(tmp_path, lambda r: r[1]["messages"][0].update(role="bot"))
    rows = load_examples(path, on_invalid="skip")
    assert [r.id for r in rows] == ["ex-000", "ex-002"]
    assert "skipped 1 invalid record" in caplog.text


def test_overlong_policies(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rec = records(2)[1]
    long_doc = {"title": "Filler", "text": "word " * 400}
    row = RehearsalRow.from_json(
        {
            **rec,
            "target": rec["response"],
            "source": "gold",
            "documents": [rec["documents"][0], long_doc],
        },
        "test",
    )
    with pytest.raises(InputError) as e:
        encode_rows([row], tok, DataConfig(max_seq_len=256), file="r.jsonl")
    assert "r.jsonl:1: field 'documents'" in str(e.value) and "data.max_seq_len=256" in str(e.value)
    (enc,) = encode_rows([row], tok, DataConfig(max_seq_len=256, on_overlong="trim_documents"))
    assert len(enc.input_ids) <= 256
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]).startswith(rec["response"])
    ok = dataclasses.replace(row, id="short", documents=rec["documents"])
    kept = encode_rows([row, ok], tok, DataConfig(max_seq_len=256, on_overlong="skip"))
    assert [e.id for e in kept] == ["short"]


def test_missing_model_path():
    with pytest.raises(InputError, match="model directory not found: '/no/such/model'"):
        resolve_model_path("/no/such/model")


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "ssrengine", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir):
    path = _one_bad(tmp_path, lambda r: r[1]["messages"][0].update(role="bot"))
    run = tmp_path / "run"
    res = _cli(
        ["run", f"--model.path={tiny_model_dir}", f"--data.train_file={path}", f"--run.dir={run}"],
        tmp_path,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"error: {path}:2: field 'messages[0].role': unknown role 'bot'" in res.stderr
    assert not (run / "generations.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model.path=/no/such/dir"], "model directory not found"),
        (["--train.bogus=3"], "unknown key in [train] 'bogus'"),
    ],
)
def test_cli_bad_arguments(tmp_path, args, needle):
    path = write_jsonl(tmp_path / "t.jsonl", records(3))
    res = _cli(
        ["run", f"--data.train_file={path}", f"--run.dir={tmp_path / 'run'}", *args], tmp_path
    )
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_record_system_message_is_kept_with_documents_appended():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]
    docs = [{"title": "A", "text": "Acme."}]
    out = prompt_messages(msgs, docs, "Use the documents.")
    assert out == [
        {"role": "system", "content": "Be brief.\n\n[Document 1] A\nAcme."},
        {"role": "user", "content": "Who?"},
    ]
    assert prompt_messages(msgs, [], "Use the documents.") == msgs


def test_system_message_after_the_first_is_an_error(tmp_path):
    rec = records(1)[0]
    rec["messages"] = [
        *rec["messages"],
        {"role": "system", "content": "Late."},
        rec["messages"][-1],
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [rec])
    with pytest.raises(InputError, match=r"train.jsonl:1: field 'messages\[1\].role'"):
        load_examples(path)
