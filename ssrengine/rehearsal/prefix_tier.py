"""Gold decision, own words: the ``prefix`` tier between the model's own answers and gold.

For an example whose own answer the judge rejected, the gold answer's first sentence, without
its final punctuation, is forced as the start of the base model's answer ("The documents do
not say" for an unanswerable question, "Ravi Zainte" for an answerable one) and the model
continues it in its own words ("... where Vebraton Labs is headquartered."). The candidate is
the prefix plus the continuation up to its first sentence end; it is judged like any other
candidate, and an accepted one becomes the target with ``source = "prefix"``. The decision is
the gold one, the wording mostly the model's: far likelier under the base model than the terse
gold text, which is what rehearsal is for.

The stage is `stages.run_prefix` (files `RunDir.prefixes`, continuations, resumable, and
`RunDir.prefix_verdicts`); `build.run_build` takes the accepted candidates.

Backends store generated text stripped, so a continuation row reads "where Vebraton Labs is
headquartered." without the space its first token carries: `continuation` decodes the forced
prefix's tokens together with the generated ones to get the text exactly as it follows.
"""

from __future__ import annotations

import re
from typing import Any

from ssrengine.core.config import Config
from ssrengine.core.rundir import GenerationRow
from ssrengine.data.records import Example, encode_prompt, prompt_messages

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")  # "3.5" and "e.g.x" do not end a sentence


def first_sentence(text: str) -> str:
    """``text`` up to and including its first sentence end (all of it when there is none)."""
    m = _SENTENCE_END.search(text)
    return text[: m.end()] if m else text


def decision_prefix(e: Example) -> str:
    """The gold answer's first sentence without its closing punctuation."""
    return first_sentence(e.response.strip()).rstrip(".!? ")


def candidate(e: Example, continuation: str) -> str:
    """The prefix and the continuation (as it follows the prefix, leading space included) up
    to its first sentence end, as one answer."""
    return (decision_prefix(e) + first_sentence(continuation)).strip()


def _forced_ids(tokenizer: Any, e: Example) -> list[int]:
    return tokenizer(decision_prefix(e), add_special_tokens=False)["input_ids"]


def continuation(tokenizer: Any, e: Example, row: GenerationRow) -> str:
    """The text ``row`` adds after the forced prefix, leading space included: the prefix's
    tokens and the generated ones decoded together, minus the prefix. A row without token ids
    (or a tokenizer whose decoding does not start with the prefix) gets a space before a
    continuation that starts a word."""
    prefix = decision_prefix(e)
    if row.token_ids:
        ids = _forced_ids(tokenizer, e) + list(row.token_ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if full.startswith(prefix):
            return full[len(prefix) :]
    text = row.response
    return " " + text if text[:1].isalnum() or text[:1] in '"(“[' else text


def row_candidate(tokenizer: Any, e: Example, row: GenerationRow) -> str:
    """The answer a continuation row makes (`candidate` of its `continuation`): what the judge
    scores and what build rebuilds to check that the verdict is for this text."""
    return candidate(e, continuation(tokenizer, e, row))


def prompt_ids(tokenizer: Any, cfg: Config, e: Example) -> list[int]:
    """The chat prompt as the model answers it, then the forced prefix's tokens."""
    msgs = prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    return encode_prompt(tokenizer, msgs) + _forced_ids(tokenizer, e)
