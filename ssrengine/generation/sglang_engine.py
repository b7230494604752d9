"""In-process SGLang: ``sglang.Engine``'s offline batch API (GPU only; the ``gpu`` extra).

The engine is started from the config (model path, ``tp_size``, ``dp_size``,
``mem_fraction_static``) and shut down at close. Each ``generate`` call hands the whole chunk
to ``Engine.generate(input_ids=[...], sampling_params=..., return_logprob=...,
token_ids_logprob=...)``, whose continuous batching schedules it; the result dicts have the
same shape as the HTTP server's /generate reply, parsed by the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.core.errors import InputError
from ssrengine.generation.base import (
    BackendError,
    Completion,
    Generator,
    Request,
    SamplingParams,
    model_name,
)
from ssrengine.generation.http import MalformedReply, PromptEncoder
from ssrengine.generation.launch import sglang_dtype
from ssrengine.generation.sglang_http import (
    parse_sglang_outputs,
    sglang_logprob_args,
    sglang_sampling,
)
from ssrengine.models.fetch import resolve_model_path


class SGLangEngineGenerator(Generator):
    backend = "sglang"

    def __init__(
        self,
        model: ModelConfig,
        gen: GenerationConfig,
        *,
        seed: int = 0,
        tokenizer: Any = None,
        **engine_args: Any,
    ) -> None:
        try:
            import sglang
        except ImportError as e:
            raise InputError(
                "generation.backend = sglang needs SGLang in this environment (GPU only): pip install "
                "'ssrengine[sglang]' where its torch/transformers pins agree (docs/generation.md, Environments)"
                f" ({e})",
                field="generation.backend",
            ) from None
        self.model = model_name(model, gen)
        trust = model.trust_remote_code
        self.enc = PromptEncoder.for_model(self.model, model, tokenizer)
        self.tokenizer = self.enc.tokenizer
        self.server = f"sglang.Engine({self.model})"
        self.engine: Any = sglang.Engine(
            model_path=str(resolve_model_path(self.model)),
            tp_size=gen.tp_size,
            dp_size=gen.dp_size,
            mem_fraction_static=gen.mem_fraction,
            dtype=sglang_dtype(model.dtype),
            trust_remote_code=trust,
            random_seed=seed,
            **engine_args,
        )

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return self.enc.tokenize(messages)

    def token_id(self, text: str) -> int:
        return self.enc.token_id(text)

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        prompts = self.enc.prompt_ids(requests)
        if not prompts:
            return []
        if self.engine is None:
            raise BackendError("the engine is shut down", server=self.server)
        try:
            outs = self.engine.generate(
                input_ids=prompts,
                sampling_params=sglang_sampling(sampling),
                **sglang_logprob_args(sampling, len(prompts)),
            )
        except Exception as e:  # CUDA OOM, a dead scheduler process, a prompt too long...
            raise BackendError(
                f"Engine.generate failed: {type(e).__name__}: {e}", server=self.server
            ) from e
        try:
            return parse_sglang_outputs(outs, len(prompts), sampling)
        except (MalformedReply, KeyError, TypeError, ValueError, IndexError) as e:
            raise BackendError(f"unexpected Engine.generate result: {e}", server=self.server) from e

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
