"""Run-dir rows as the stages would have written them under a config (their keys current)."""

from __future__ import annotations

from ssrengine.core.config import Config
from ssrengine.core.rundir import GenerationRow, VerdictRow
from ssrengine.data.records import Example
from ssrengine.rehearsal.stages import (
    generation_keys,
    make_judge,
    open_generator,
    verdict_input_hash,
)


def generations(cfg: Config, examples: list[Example], responses: dict[str, str]) -> list[dict]:
    """generations.jsonl rows answering ``responses[id]`` under ``cfg``'s generation key."""
    gen = open_generator(cfg)  # lazy: reads only the backend and model names
    keys = generation_keys(cfg, examples, gen)
    return [
        GenerationRow(
            e.id, responses[e.id], [], "stop", gen.backend, gen.model, keys[e.id].rsplit("|", 1)[1]
        ).to_json()
        for e in examples
    ]


def verdict(cfg: Config, e: Example, candidate: str, accept: bool = True) -> dict:
    """A verdict of ``cfg``'s judge on ``candidate`` for ``e``."""
    name = make_judge(cfg, open_generator(cfg, for_judge=True)).name
    return VerdictRow(e.id, accept, 1.0, "ok", name, verdict_input_hash(e, candidate)).to_json()
