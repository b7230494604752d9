"""Gold decision, own words: the ``prefix`` tier between the model's own answers and gold.

For an example whose own answer the judge rejected, the gold answer's first sentence, without
its final punctuation, is forced as the start of the base model's answer ("The documents do
not say" for an unanswerable question, "Ravi Zainte" for an answerable one) and the model
continues it in its own words ("... where Vebraton Labs is headquartered."). The candidate is
the prefix plus the continuation up to its first sentence end; it is judged like any other
candidate, and an accepted one becomes the target with ``source = "prefix"``. The decision is
the gold one, the wording mostly the model's: far likelier under the base model than the terse
gold text, which is what rehearsal is for.

Files: `RunDir.prefixes` (continuations, resumable) and `RunDir.prefix_verdicts`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ssrengine.config import Config
from ssrengine.data import Example, encode_prompt, prompt_messages
from ssrengine.generation.base import model_name
from ssrengine.judge import Verdict
from ssrengine.rundir import GenerationRow, RunDir, VerdictRow, read_typed
from ssrengine.stages import (
    _judge_with,
    _stage_rows,
    generate_rows,
    judge_rows,
    open_generator,
    verdict_input_hash,
)

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")  # "3.5" and "e.g.x" do not end a sentence


def first_sentence(text: str) -> str:
    """``text`` up to and including its first sentence end (all of it when there is none)."""
    m = _SENTENCE_END.search(text)
    return text[: m.end()] if m else text


def decision_prefix(e: Example) -> str:
    """The gold answer's first sentence without its closing punctuation."""
    return first_sentence(e.response.strip()).rstrip(".!? ")


def candidate(e: Example, continuation: str) -> str:
    """The prefix and the continuation up to its first sentence end, as one answer."""
    return (decision_prefix(e) + first_sentence(continuation)).strip()


def prompt_ids(tokenizer: Any, cfg: Config, e: Example) -> list[int]:
    """The chat prompt as the model answers it, then the forced prefix's tokens."""
    msgs = prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    forced = tokenizer(decision_prefix(e), add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, msgs) + forced


def run_prefix(cfg: Config, run_dir: Path, rejected: list[Example]) -> dict[str, Verdict]:
    """Continue the forced gold decision for every rejected example, then judge the result."""
    from ssrengine.models import load_tokenizer

    rd = RunDir(run_dir)
    tok = load_tokenizer(
        model_name(cfg.model, cfg.generation), trust_remote_code=cfg.model.trust_remote_code
    )
    with open_generator(cfg) as gen:
        rows = generate_rows(
            cfg,
            run_dir,
            rejected,
            gen,
            path=rd.prefixes,
            ids_fn=lambda e: prompt_ids(tok, cfg, e),
        )
    cands = {e.id: candidate(e, rows[e.id].response) for e in rejected}
    return _judge_with(
        cfg, lambda j: judge_rows(cfg, run_dir, rejected, cands, j, path=rd.prefix_verdicts)
    )


def accepted_prefix_targets(rd: RunDir, examples: list[Example]) -> dict[str, str]:
    """Build stage: the accepted prefix-tier candidate of each example that has one, by id.
    A verdict counts only for exactly the candidate rebuilt from the current continuation."""
    conts = _stage_rows(rd.prefixes, GenerationRow, "judge (prefix tier)")
    verdicts = (
        {r.id: r for r in read_typed(rd.prefix_verdicts, VerdictRow)}
        if rd.prefix_verdicts.exists()
        else {}
    )
    out = {}
    for e in examples:
        row, v = conts.get(e.id), verdicts.get(e.id)
        if row is None or v is None or not row.response.strip():
            continue
        text = candidate(e, row.response)
        if v.accept and v.input_hash == verdict_input_hash(e, text):
            out[e.id] = text
    return out
