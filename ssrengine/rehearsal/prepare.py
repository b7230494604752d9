"""The prepare stage: the training records validated and fitted to data.max_seq_len once
(documents trimmed, or the example skipped, as data.on_overlong says); every later stage
renders the prompts of these fitted examples."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.data.builtin import resolve_data_file
from ssrengine.data.records import IGNORE_INDEX, Example, encode, load_examples, prompt_messages

log = logging.getLogger(__name__)


def train_examples(cfg: Config) -> list[Example]:
    """data.train_file as read and validated, before fitting (see `prepare`)."""
    path = resolve_data_file(cfg.data.train_file, cfg.data.seed)
    return load_examples(
        path,
        split=cfg.data.split,
        on_invalid=cfg.data.on_invalid,
        columns=cfg.data.columns,
        max_examples=cfg.data.max_examples,
        max_record_bytes=cfg.data.max_record_bytes,
    )


def prepare(cfg: Config, examples: list[Example] | None = None) -> list[Example]:
    """The training examples, validated and fitted to data.max_seq_len once, before generate.

    Every stage renders an example's prompt as ``prompt_messages(e.messages, e.documents,
    data.system_prompt)`` of these examples, so generate, judge, build, train and render see
    the same prompt. An example fits when its prompt plus the longer of its gold answer and,
    in ssr mode, a model answer of generation.max_new_tokens is at most data.max_seq_len.
    data.on_overlong: ``error`` names the input file and line; ``trim_documents`` drops
    documents from the end until it fits; ``skip`` leaves the example out of every stage."""
    from ssrengine.models.loading import load_tokenizer

    examples = examples if examples is not None else train_examples(cfg)
    tok = load_tokenizer(
        cfg.model.path,
        trust_remote_code=cfg.model.trust_remote_code,
        chat_template=cfg.model.chat_template,
    )
    d = cfg.data
    reserve = cfg.generation.max_new_tokens if cfg.run.mode == "ssr" else 0
    out, trimmed, skipped = [], 0, 0
    for e in examples:
        docs = list(e.documents)
        n = _length(tok, prompt_messages(e.messages, docs, d.system_prompt), e.response, reserve)
        while n > d.max_seq_len and d.on_overlong == "trim_documents" and docs:
            docs.pop()  # the last document goes first; the target is never touched
            msgs = prompt_messages(e.messages, docs, d.system_prompt)
            n = _length(tok, msgs, e.response, reserve)
        if n <= d.max_seq_len:
            trimmed += len(docs) < len(e.documents)
            out.append(replace(e, documents=docs) if len(docs) < len(e.documents) else e)
            continue
        if d.on_overlong == "skip":
            skipped += 1
            continue
        answer = f" (its answer may take generation.max_new_tokens={reserve})" if reserve else ""
        fix = "skip" if d.on_overlong == "trim_documents" else "trim_documents or skip"
        raise InputError(
            f"example {e.id!r} needs {n} tokens{' without documents' if e.documents and not docs else ''}, "
            f"more than data.max_seq_len={d.max_seq_len}{answer}; set data.on_overlong = {fix} "
            "or raise data.max_seq_len",
            file=e.file,
            line=e.line,
            field="documents" if docs else "messages",
        )
    if trimmed:
        log.warning(
            "trimmed documents of %d over-long example(s) to fit data.max_seq_len=%d",
            trimmed,
            d.max_seq_len,
        )
    if skipped:
        log.warning(
            "skipped %d over-long example(s) (data.on_overlong = %s)", skipped, d.on_overlong
        )
    if not out:
        raise InputError("no example fits data.max_seq_len", field="data.train_file")
    return out


def _length(tok: Any, messages: list[dict[str, str]], target: str, reserve: int) -> int:
    """Tokens of prompt + target (end of turn included), the target at least ``reserve`` long."""
    ids, labels = encode(tok, messages, target)
    n_prompt = labels.count(IGNORE_INDEX)
    n_target = len(ids) - n_prompt
    if reserve:
        end_of_turn = len(encode(tok, messages, "")[0]) - n_prompt
        n_target = max(n_target, reserve + end_of_turn)
    return n_prompt + n_target
