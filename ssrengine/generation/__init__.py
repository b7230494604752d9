"""Generation backends behind one protocol; `make_generator` opens one from the config."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ssrengine.core.config import Config, GenerationConfig, ModelConfig
from ssrengine.core.errors import InputError
from ssrengine.generation.base import (
    BackendError,
    Completion,
    Generator,
    Request,
    SamplingParams,
    model_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "BackendError",
    "Completion",
    "Generator",
    "Request",
    "SamplingParams",
    "generation_config",
    "make_generator",
]


def generation_config(cfg: Config, *, for_judge: bool = False) -> GenerationConfig:
    """``cfg.generation`` as a backend gets it: ``model`` resolved (empty: model.path) and, for
    the LLM judge, judge.backend / judge.model / judge.url where set, and judge.batch_size."""
    g, j = cfg.generation, cfg.judge
    g = replace(g, model=model_name(cfg.model, g))
    if not for_judge:
        return g
    return replace(
        g,
        backend=j.backend or g.backend,
        model=j.model or g.model,
        url=j.url or g.url,
        batch_size=j.batch_size,
    )


def make_generator(
    model: ModelConfig, gen: GenerationConfig, *, tokenizer: Any = None, **backend_args: Any
) -> Generator:
    """Open ``gen.backend`` for ``gen.model`` (empty: ``model.path``).

    ``tokenizer``: a loaded tokenizer to reuse. ``backend_args``: settings outside the config,
    for the backend's constructor: ``backoff_s`` (HTTP backends' first retry delay),
    ``served_model`` and ``api_key`` (openai)."""
    if gen.backend == "hf":
        from ssrengine.generation.hf import HFGenerator

        return HFGenerator(model, gen, tokenizer=tokenizer, **backend_args)
    if gen.backend != "sglang-http" and gen.launch:
        log.warning(
            "generation.launch applies to the sglang-http backend only; ignored for %s",
            gen.backend,
        )
    if gen.backend == "sglang":
        from ssrengine.generation.sglang_engine import SGLangEngineGenerator

        return SGLangEngineGenerator(model, gen, tokenizer=tokenizer, **backend_args)
    if gen.backend == "sglang-http":
        from ssrengine.generation.sglang_http import SGLangHTTPGenerator

        return SGLangHTTPGenerator(model, gen, tokenizer=tokenizer, **backend_args)
    if gen.backend == "openai":
        from ssrengine.generation.openai import OpenAIGenerator

        return OpenAIGenerator(model, gen, tokenizer=tokenizer, **backend_args)
    raise InputError(
        f"unknown generation backend {gen.backend!r}; one of: hf, sglang, sglang-http, openai",
        field="generation.backend",
    )
