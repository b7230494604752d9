"""Record shapes beyond ours and TRL's (ssrengine.data.shapes): Alpaca, ShareGPT, content
parts; tools refused in one line; a conversation without the gold answer named as such."""

from __future__ import annotations

import json

import pytest

from ssrengine.core.errors import InputError
from ssrengine.data.records import load_examples, parse_record

Q, A = "Who founded Acme?", "Mara Quill."


def parse(obj):
    return parse_record(obj, file="d.jsonl", line=3)


def test_alpaca_instruction_input_output():
    ex = parse({"instruction": "Summarize.", "input": "Acme was founded in 1990.", "output": A})
    assert ex.messages == [{"role": "user", "content": "Summarize.\n\nAcme was founded in 1990."}]
    assert ex.response == A and ex.documents == []
    ex = parse({"instruction": Q, "input": "", "output": A, "system": "Be brief."})
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": Q},
    ]


def test_sharegpt_conversations():
    ex = parse(
        {
            "id": "s1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": Q},
                {"from": "gpt", "value": A},
            ],
        }
    )
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user"]
    assert ex.messages[-1]["content"] == Q and ex.response == A and ex.id == "s1"


def test_content_parts_are_joined_text():
    ex = parse(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Who founded "}, "Acme?"]},
                {"role": "assistant", "content": [{"type": "text", "text": A}]},
            ]
        }
    )
    assert ex.messages == [{"role": "user", "content": Q}] and ex.response == A
    # The same record in plain strings gets the same content id.
    plain = parse(
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}
    )
    assert ex.id == plain.id


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"messages": [{"role": "user", "content": Q}], "response": A, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages[1].tool_calls"),
        ({"messages": [{"role": "user", "content": Q}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": A}]}, "messages[1].role"),
        ({"conversations": [{"from": "human", "value": Q}, {"from": "function_call", "value": "{}"}]}, "conversations[1].from"),
    ],
)  # fmt: skip
def test_tools_are_refused_in_one_line(record, field):
    with pytest.raises(InputError) as e:
        parse(record)
    assert e.value.field == field and "tool use is not trained" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "response": A}, "messages[0].content[0]", "image_url content part"),
        ({"conversations": [{"from": "narrator", "value": Q}]}, "conversations[0].from", "unknown speaker 'narrator'"),
        ({"conversations": [{"from": "human", "value": ""}]}, "conversations[0].value", "missing or empty"),
        ({"instruction": Q}, "output", "Alpaca record's gold answer"),
        ({"instruction": Q, "output": 4}, "output", "expected a string"),
    ],
)  # fmt: skip
def test_shape_errors_name_the_field(record, field, message):
    with pytest.raises(InputError, match=message) as e:
        parse(record)
    assert e.value.field == field and e.value.line == 3


def test_a_conversation_ending_with_the_user_names_the_missing_gold_answer():
    record = {"messages": [{"role": "user", "content": Q}]}
    with pytest.raises(InputError) as e:
        parse(record)
    assert e.value.field == "messages[0].role"
    assert "last message must be the assistant's gold answer" in str(e.value)
    sharegpt = {"conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": Q}]}
    with pytest.raises(InputError, match="ends with a user turn"):
        parse(sharegpt)


def test_mixed_shapes_load_from_one_file(tmp_path):
    p = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": Q, "output": A},
        {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
        {"messages": [{"role": "user", "content": Q}], "response": A},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(p)
    assert [(e.messages, e.response) for e in examples] == [
        ([{"role": "user", "content": Q}], A)
    ] * 3
    assert [e.id for e in examples][1:] == [examples[0].id + "-2", examples[0].id + "-3"]


def test_the_grounded_qa_instruction_only_where_records_carry_documents():
    from ssrengine.core.config import DataConfig
    from ssrengine.data.records import prompt_messages

    default = DataConfig().system_prompt
    user = [{"role": "user", "content": Q}]
    docs = [{"title": "Acme", "text": "Acme was founded by Mara Quill."}]
    assert prompt_messages(user, [], default) == user  # no "using only the documents"
    grounded = prompt_messages(user, docs, default)
    assert grounded[0]["role"] == "system" and grounded[0]["content"].startswith(default)
    assert "Mara Quill" in grounded[0]["content"]
    # A prompt of your own applies to every record; a record's own system message wins.
    assert prompt_messages(user, [], "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        *user,
    ]
    own = [{"role": "system", "content": "Mine."}, *user]
    assert prompt_messages(own, [], default) == own


def test_data_columns_map_your_column_names(tmp_path):
    from ssrengine.core.config_load import load_config

    p = tmp_path / "qa.jsonl"
    rows = [{"question": Q, "answer": A, "uid": "q1"}, {"question": "Why?", "answer": "Because."}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\ncolumns = {prompt = "question", completion = "answer", id = "uid"}\n')
    cfg = load_config(toml)
    (ex,) = load_examples(p, columns=cfg.data.columns)
    assert (ex.id, ex.messages, ex.response) == ("q1", [{"role": "user", "content": Q}], A)
    # A row without a mapped column names it, with file and line.
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"column missing \(data.columns maps it to 'id'\)") as e:
        load_examples(p, columns=cfg.data.columns)
    assert (e.value.line, e.value.field) == (2, "uid")
    with pytest.raises(InputError, match="'question' is not a record field") as e:
        load_examples(p, columns='{"question": "q"}')
    assert e.value.field == "data.columns"
