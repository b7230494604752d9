"""Record shapes beyond ours and TRL's, mapped onto them before validation: Alpaca
(``instruction`` / ``input`` / ``output``), ShareGPT (``conversations`` of ``{from, value}``),
message content given as a list of parts (``[{"type": "text", "text": ...}]``). What cannot
be trained on as text is refused in one line naming the field, never dropped: tool
definitions (``tools``), tool calls and tool results, non-text content parts (images, audio).
`ssrengine.data.records.parse_record` calls `normalize` first; errors go through its ``bad``,
so they name file, line and field like every other record error."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ssrengine.core.errors import InputError

Bad = Callable[[str, str], Exception]

# ShareGPT speaker names (FastChat's, LLaMA-Factory's and Axolotl's spellings) → chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
TOOL_TURNS = ("tool", "function", "function_call", "observation", "ipython")
TOOLS_REFUSED = (
    "tool use is not trained: ssrengine trains on text turns only and would drop it; remove "
    "the tool definitions and tool turns from this record, or write them into the text"
)


def normalize(obj: dict[str, Any], bad: Bad, response_key: str = "response") -> dict[str, Any]:
    """``obj`` in our or TRL's shape (a new dict where anything changed)."""
    if obj.get("tools") not in (None, [], ""):
        raise bad(TOOLS_REFUSED, "tools")
    shapes = {"messages", "prompt", "completion", response_key, "conversations"}
    if "instruction" in obj and not shapes & obj.keys():
        obj = _alpaca(obj, bad)
    elif "conversations" in obj and "messages" not in obj:
        obj = _sharegpt(obj, bad)
    out = dict(obj)
    for key in ("messages", "prompt", "completion"):
        if isinstance(obj.get(key), list):
            out[key] = [_message(m, f"{key}[{i}]", bad) for i, m in enumerate(obj[key])]
    msgs = out.get("messages")
    if isinstance(msgs, list) and msgs and out.get(response_key) is None:
        last = msgs[-1]
        if isinstance(last, dict) and last.get("role") in ("user", "system"):
            raise bad(
                f"the conversation ends with a {last['role']} turn, but its last message must "
                f"be the assistant's gold answer (or give the answer as '{response_key}')",
                f"messages[{len(msgs) - 1}].role",
            )
    return out


def _alpaca(obj: dict[str, Any], bad: Bad) -> dict[str, Any]:
    """``instruction`` (+ ``input``, after a blank line) is the user turn, ``output`` the gold
    answer; ``system`` (as in some Alpaca variants) the record's system message."""
    rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output", "system")}
    for key in ("instruction", "input", "output", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise bad(f"expected a string, got {type(obj[key]).__name__}", key)
    if not (obj.get("instruction") or "").strip():
        raise bad("missing or empty (an Alpaca record's task)", "instruction")
    if obj.get("output") is None:
        raise bad("missing; an Alpaca record's gold answer", "output")
    user = obj["instruction"] + (f"\n\n{obj['input']}" if (obj.get("input") or "").strip() else "")
    system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return {
        **rest,
        "messages": [*system, {"role": "user", "content": user}],
        "response": obj["output"],
    }


def _sharegpt(obj: dict[str, Any], bad: Bad) -> dict[str, Any]:
    conv = obj["conversations"]
    if not isinstance(conv, list) or not conv:
        raise bad("missing or empty; expected a list of {from, value}", "conversations")
    msgs = []
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise bad("expected an object {from, value}", where)
        speaker = turn.get("from")
        if speaker in TOOL_TURNS:
            raise bad(TOOLS_REFUSED, f"{where}.from")
        if speaker not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise bad(f"unknown speaker {speaker!r}; expected one of {known}", f"{where}.from")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise bad("missing or empty; expected the turn's text", f"{where}.value")
        msgs.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    rest = {k: v for k, v in obj.items() if k not in ("conversations", "system")}
    return {**rest, "messages": msgs}


def _message(m: Any, where: str, bad: Bad) -> Any:
    """One message with list-of-parts content joined into its text; tool turns refused."""
    if not isinstance(m, dict):
        return m  # records.py names the shape error
    if m.get("role") in TOOL_TURNS:
        raise bad(TOOLS_REFUSED, f"{where}.role")
    for key in ("tool_calls", "function_call"):
        if m.get(key):
            raise bad(TOOLS_REFUSED, f"{where}.{key}")
    content = m.get("content")
    if not isinstance(content, list):
        return m
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad(
                f"a {kind or type(part).__name__!s} content part: only text is trained on "
                "(remove the part or the record)",
                f"{where}.content[{j}]",
            )
        texts.append(part["text"])
    # OpenAI-style parts are consecutive pieces of one text: joined as they are.
    return {**m, "content": "".join(texts)}


# The record fields data.columns may map a column onto.
FIELDS = (
    "id",
    "documents",
    "messages",
    "response",
    "answerable",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "system",
    "conversations",
)


def column_map(columns: str) -> dict[str, str]:
    """data.columns (JSON text of ``{field: your column}``), checked against `FIELDS`."""
    mapping = json.loads(columns or "{}")
    for fld, col in mapping.items():
        if fld not in FIELDS:
            raise InputError(
                f"{fld!r} is not a record field; known: {', '.join(FIELDS)}", field="data.columns"
            )
        if not isinstance(col, str) or not col:
            raise InputError(f"{fld}: expected a column name, got {col!r}", field="data.columns")
    return mapping


def rename_columns(obj: dict[str, Any], mapping: dict[str, str], bad: Bad) -> dict[str, Any]:
    """``obj`` with each mapped column under its field's name (data.columns)."""
    if not mapping:
        return obj
    out = dict(obj)
    for fld, col in mapping.items():
        if col not in obj:
            raise bad(f"column missing (data.columns maps it to {fld!r})", col)
        if fld in obj and fld != col and fld not in mapping.values():
            raise bad(
                f"the record has both {fld!r} and {col!r} (data.columns maps it to {fld!r})", col
            )
        out[fld] = obj[col]
        if col not in mapping:  # a column mapped away, unless it is itself a mapped field
            out.pop(col, None)
    return out
