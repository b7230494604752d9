"""Input records: validation with precise errors, prompt rendering, tokenization with labels.

Record format: ``{id?, documents?, messages, response, answerable?}``, or TRL's conversational
(``messages`` ending in the assistant's gold turn) and prompt/completion shapes. Prompts are
rendered with the model's own chat template; documents enter through `render_documents` only.
Every prompt token gets the label IGNORE_INDEX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssrengine.core.config import DataConfig
from ssrengine.core.errors import InputError
from ssrengine.data import shapes
from ssrengine.data.files import RECORD_LIMIT, read_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of every token that is not supervised (prompt, padding)

ROLES = ("system", "user", "assistant")
# data.system_prompt's default, an instruction about documents.
GROUNDED_QA_PROMPT: str = DataConfig.__dataclass_fields__["system_prompt"].default


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict[str, str]]  # the conversation so far; the last turn is the user's
    response: str  # gold answer for the next assistant turn
    documents: list[dict[str, str]] = field(default_factory=list)
    answerable: bool | None = None
    file: str = ""
    line: int = 0

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": self.id,
            "documents": self.documents,
            "messages": self.messages,
            "response": self.response,
        }
        if self.answerable is not None:
            rec["answerable"] = self.answerable
        return rec


def _messages(msgs: Any, fld: str, bad: Any) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise bad("missing or empty; expected a list of {role, content}", fld)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad("expected an object {role, content}", f"{fld}[{i}]")
        if m.get("role") not in ROLES:
            raise bad(
                f"unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}",
                f"{fld}[{i}].role",
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise bad("missing or empty content", f"{fld}[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _dialog_and_answer(obj: dict[str, Any], response_key: str, bad: Any) -> tuple[Any, Any, str]:
    """(messages, gold answer, the answer's field) from any accepted record shape:
    ``messages`` + ``response``; TRL conversational (``messages`` ending in the assistant's
    gold turn); TRL prompt/completion (each a string or a message list)."""
    has = {k for k in ("messages", response_key, "prompt", "completion") if obj.get(k) is not None}
    if has & {"prompt", "completion"}:
        if has & {"messages", response_key}:
            raise bad(f"a record has messages + {response_key}, or prompt + completion", "prompt")
        prompt = obj.get("prompt")
        if prompt is None:
            raise bad("missing; expected the prompt as a string or a message list", "prompt")
        msgs = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _messages(prompt, "prompt", bad)
        )
        comp = obj.get("completion")
        if isinstance(comp, list):
            done = _messages(comp, "completion", bad)
            if len(done) != 1 or done[0]["role"] != "assistant":
                raise bad("expected one assistant message (the gold answer)", "completion")
            comp = done[0]["content"]
        return msgs, comp, "completion"
    msgs = _messages(obj.get("messages"), "messages", bad)
    if obj.get(response_key) is None and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"], f"messages[{len(msgs) - 1}].content"
    return msgs, obj.get(response_key), response_key


def _bad_at(file: str, line: int) -> shapes.Bad:
    return lambda msg, fld: InputError(msg, file=file, line=line, field=fld)


def content_id(rec: dict[str, Any]) -> str:
    """The id of a record without one: a hash of its content, stable across runs and formats."""
    blob = json.dumps(rec, sort_keys=True, ensure_ascii=False).encode()
    return "sha-" + hashlib.sha256(blob).hexdigest()[:16]


def parse_record(
    obj: dict[str, Any], *, file: str, line: int, response_key: str = "response"
) -> Example:
    """Validate one record (any accepted shape, see docs/data.md) into an Example; errors name
    file, line (or row) and field."""

    def bad(msg: str, fld: str) -> InputError:
        return InputError(msg, file=file, line=line, field=fld)

    obj = shapes.normalize(obj, bad, response_key)  # Alpaca, ShareGPT, content parts, tools
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if rid is not None and (not isinstance(rid, str) or not rid.strip()):
        raise bad("empty or not a string; give a non-empty id or leave it out", "id")
    msgs, resp, resp_field = _dialog_and_answer(obj, response_key, bad)
    if not msgs:
        raise bad("no turn before the gold answer; expected the user's question", "messages")
    where = "prompt" if resp_field == "completion" else "messages"
    for i, m in enumerate(msgs[1:], 1):
        if m["role"] == "system":
            # One defined place for the record's own instruction (see prompt_messages).
            raise bad("a system message may only be the first message", f"{where}[{i}].role")
    if msgs[-1]["role"] != "user":
        raise bad(
            "the last message must be the user's turn being answered",
            f"{where}[{len(msgs) - 1}].role",
        )
    if not isinstance(resp, str):
        raise bad("missing; expected the gold answer as a string", resp_field)
    if not resp.strip():
        raise bad("empty response (the gold answer)", resp_field)
    docs = obj.get("documents", [])
    if docs is None:
        docs = []
    if not isinstance(docs, list):
        raise bad("expected a list of {title, text}", "documents")
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
            raise bad("expected an object with a string 'text'", f"documents[{i}]")
        if d.get("title") is not None and not isinstance(d["title"], str):
            raise bad("expected a string", f"documents[{i}].title")
    ans = obj.get("answerable")
    if ans is not None and not isinstance(ans, bool):
        raise bad(f"expected true/false, got {ans!r}", "answerable")
    documents = [{"title": d.get("title") or "", "text": d["text"]} for d in docs]
    if rid is None:
        content = {"documents": documents, "messages": msgs, "response": resp}
        rid = content_id(content if ans is None else {**content, "answerable": ans})
    return Example(
        id=rid,
        messages=msgs,
        response=resp,
        documents=documents,
        answerable=ans,
        file=file,
        line=line,
    )


def load_examples(
    path: str | Path,
    *,
    split: str | None = None,
    on_invalid: str = "error",
    max_examples: int = 0,
    columns: str = "{}",
    max_record_bytes: int = 0,
) -> list[Example]:
    """Read and validate a data file or dataset directory (any format of
    `ssrengine.data.files`). Duplicate ids are an error (they break resume); records
    without an id that repeat one another's content get ``-2``, ``-3``... after their hash.
    ``max_record_bytes`` (data.max_record_bytes, 0 = none): a larger record stops the read
    before it is parsed (JSONL) or validated and tokenized (other formats)."""
    path = Path(path)
    mapping = shapes.column_map(columns)
    out: list[Example] = []
    seen: dict[str, int] = {}
    skipped = 0
    for lineno, obj in read_rows(path, split, max_line_bytes=max_record_bytes):
        if max_record_bytes and (size := text_bytes(obj)) > max_record_bytes:
            raise InputError(
                f"record holds {size} bytes of text, more than {RECORD_LIMIT}="
                f"{max_record_bytes} (raise {RECORD_LIMIT} if it is meant to be this long)",
                file=str(path),
                line=lineno,
            )
        try:
            obj = shapes.rename_columns(obj, mapping, _bad_at(str(path), lineno))
            ex = parse_record(obj, file=str(path), line=lineno)
        except InputError as e:
            if on_invalid != "skip":
                raise
            skipped += 1
            log.warning("skipping invalid record: %s", e)
            continue
        if ex.id in seen and obj.get("id") is None:
            n = 2
            while f"{ex.id}-{n}" in seen:
                n += 1
            ex = dataclasses.replace(ex, id=f"{ex.id}-{n}")
        if ex.id in seen:
            raise InputError(
                f"duplicate id {ex.id!r} (first on line {seen[ex.id]})",
                file=str(path),
                line=lineno,
                field="id",
            )
        seen[ex.id] = lineno
        out.append(ex)
        if max_examples and len(out) >= max_examples:
            break
    if skipped:
        log.warning("%s: skipped %d invalid record(s) (data.on_invalid = skip)", path, skipped)
    if not out:
        raise InputError("no usable examples", file=str(path))
    return out


def text_bytes(obj: Any) -> int:
    """UTF-8 bytes of every string in ``obj`` (a record: nested lists and objects)."""
    if isinstance(obj, str):
        return len(obj.encode("utf-8", "surrogatepass"))
    if isinstance(obj, dict):
        return sum(text_bytes(k) + text_bytes(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(text_bytes(v) for v in obj)
    return 0


def render_documents(documents: list[dict[str, str]]) -> str:
    """The one place documents become prompt text."""
    parts = []
    for i, d in enumerate(documents, 1):
        title = f" {d['title']}" if d.get("title") else ""
        parts.append(f"[Document {i}]{title}\n{d['text']}")
    return "\n\n".join(parts)


def prompt_messages(
    messages: list[dict[str, str]], documents: list[dict[str, str]], system_prompt: str
) -> list[dict[str, str]]:
    """Chat messages for the model: one system turn, then the dialog.

    The system turn is the record's own system message when it has one (its first message),
    else ``system_prompt`` (data.system_prompt; its default, `GROUNDED_QA_PROMPT`, only for a
    record with documents: a record without gets no system turn); the documents are appended to it after a
    blank line. Nothing of the record is dropped."""
    own = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    system = system_prompt if own is None else own
    if own is None and not documents and system_prompt == GROUNDED_QA_PROMPT:
        system = ""  # the default instruction is about documents: not for a record without
    if documents:
        system = (
            f"{system}\n\n{render_documents(documents)}" if system else render_documents(documents)
        )
    head = [{"role": "system", "content": system}] if system else []
    return head + (messages[1:] if own is not None else messages)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_completion(
    tokenizer: Any, messages: list[dict[str, str]], target: str
) -> tuple[str, str]:
    """(prompt text, completion text): the completion is everything the template adds after the
    generation prompt for this assistant turn, end-of-turn tokens included."""
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": target}], tokenize=False
    )
    if not full.startswith(prompt):
        raise InputError(
            "the chat template does not render the prompt as a prefix of prompt + answer; "
            "cannot locate the target tokens",
            field="model.path (chat template)",
        )
    return prompt, full[len(prompt) :]


def encode(
    tokenizer: Any, messages: list[dict[str, str]], target: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE_INDEX on every prompt token.

    Prompt and completion are tokenized separately so the boundary is exactly the chat
    template's generation prompt, whatever the BPE merges would do across it."""
    prompt, completion = render_completion(tokenizer, messages, target)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p + c, [IGNORE_INDEX] * len(p) + c


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
