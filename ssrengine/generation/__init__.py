"""Generation backends behind one protocol; `make_generator` picks one from the config."""

from __future__ import annotations

import logging
from typing import Any

from ssrengine.errors import InputError
from ssrengine.generation.base import BackendError, Completion, Generator, Request, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["BackendError", "Completion", "Generator", "Request", "SamplingParams", "make_generator"]


def make_generator(
    backend: str,
    model: str,
    *,
    url: str = "",
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    **options: Any,
) -> Generator:
    """Open a backend. ``options`` carries backend-specific settings: launch, tp_size, dp_size,
    mem_fraction (SGLang); concurrency, timeout_s, max_retries, backoff_s (HTTP backends);
    served_model, api_key (openai); tokenizer (a loaded tokenizer to reuse)."""
    if backend == "hf":
        from ssrengine.generation.hf import HFGenerator

        return HFGenerator(
            model,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        )
    common = {"trust_remote_code": trust_remote_code, **_pick(options, "tokenizer")}
    http = _pick(options, "concurrency", "timeout_s", "max_retries", "backoff_s")
    sglang = _pick(options, "tp_size", "dp_size", "mem_fraction")
    if backend != "sglang-http" and options.get("launch"):
        log.warning(
            "generation.launch applies to the sglang-http backend only; ignored for %s", backend
        )
    if backend == "sglang":
        from ssrengine.generation.sglang_engine import SGLangEngineGenerator

        return SGLangEngineGenerator(model, dtype=dtype, **sglang, **common)
    if backend == "sglang-http":
        from ssrengine.generation.sglang_http import SGLangHTTPGenerator

        return SGLangHTTPGenerator(
            model,
            url=url,
            batch_size=batch_size,
            launch=bool(options.get("launch", False)),
            dtype=dtype,
            **_pick(options, "launch_python"),
            **sglang,
            **http,
            **common,
        )
    if backend == "openai":
        from ssrengine.generation.openai import OpenAIGenerator

        return OpenAIGenerator(
            model,
            url=url,
            batch_size=batch_size,
            **_pick(options, "served_model", "api_key"),
            **http,
            **common,
        )
    raise InputError(
        f"unknown generation backend {backend!r}; one of: hf, sglang, sglang-http, openai",
        field="generation.backend",
    )


def _pick(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: options[k] for k in names if k in options}
