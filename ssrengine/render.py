"""``python -m ssrengine render --config FILE [--n N] [--tokens]``: what the model is trained on.

For the first N records of data.train_file, fitted to data.max_seq_len as a run fits them,
prints the exact text the model sees — chat template, system turn, documents, dialog — with the
supervised span (the tokens whose label is not -100) between ``⟦`` and ``⟧`` (green on a
terminal). ``--tokens`` lists every token as ``text(label)`` instead, as axolotl's debug
preprocessing does. The target shown is the gold answer; in run.mode = ssr a run trains on the
model's own answer instead where the judge accepts it, under the same prompt.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.data.records import IGNORE_INDEX, encode, prompt_messages

OPEN, CLOSE = "⟦", "⟧"
GREEN, RED, RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"


def render(cfg: Config, n: int = 3, *, tokens: bool = False, color: bool = False) -> str:
    """The rendering of the first ``n`` training examples as one printable string."""
    from ssrengine.models.loading import load_tokenizer
    from ssrengine.rehearsal.prepare import prepare, train_examples

    if n < 1:
        raise InputError(f"expected at least 1 record, got {n}", field="--n")
    limit = min(n, cfg.data.max_examples) if cfg.data.max_examples else n
    raw = train_examples(replace(cfg, data=replace(cfg.data, max_examples=limit)))
    tok = load_tokenizer(
        cfg.model.path,
        trust_remote_code=cfg.model.trust_remote_code,
        chat_template=cfg.model.chat_template,
    )
    by_id = {e.id: e for e in raw}
    out = []
    for e in prepare(cfg, raw):
        ids, labels = encode(
            tok, prompt_messages(e.messages, e.documents, cfg.data.system_prompt), e.response
        )
        n_prompt = labels.count(IGNORE_INDEX)
        head = (
            f"=== {e.id} ({e.file}:{e.line}): {len(ids)} tokens, {n_prompt} prompt "
            f"(label {IGNORE_INDEX}), {len(ids) - n_prompt} supervised"
        )
        dropped = len(by_id[e.id].documents) - len(e.documents)
        if dropped:
            head += f"; {dropped} document(s) trimmed (data.on_overlong)"
        out.append(head + " ===")
        if tokens:
            out.append(" ".join(_token(tok, i, label, color) for i, label in zip(ids, labels)))
        else:
            start, end = (GREEN, RESET) if color else (OPEN, CLOSE)
            out.append(f"{tok.decode(ids[:n_prompt])}{start}{tok.decode(ids[n_prompt:])}{end}")
    if len(out) // 2 < len(raw):
        out.append(
            f"({len(raw) - len(out) // 2} over-long record(s) skipped: data.on_overlong = skip)"
        )
    return "\n".join(out)


def _token(tok: Any, token_id: int, label: int, color: bool) -> str:
    text = f"{tok.decode([token_id])!r}({label})"
    if not color:
        return text
    return f"{RED if label == IGNORE_INDEX else GREEN}{text}{RESET}"
