"""The Generator protocol: token-in/token-out generation shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ssrengine.core.config import GenerationConfig, ModelConfig


@dataclass(frozen=True)
class SamplingParams:
    """One call's sampling; the run's values come from the generation config. The defaults
    are the neutral ones (greedy, no nucleus cut, no stop strings)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # Return, for every generated position, the logprob of each of these token ids
    # (SGLang's token_ids_logprob); the LLM judge asks for "Yes"/"No" on one step.
    logprob_token_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Request:
    """One prompt: chat messages (rendered with the model's chat template) or token ids."""

    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.input_ids is None):
            raise ValueError("Request needs exactly one of messages or input_ids")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    # One dict per generated position: token id -> logprob, for SamplingParams.logprob_token_ids.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0


class Generator(Protocol):
    """A generation backend. Use as a context manager so servers and engines are shut down."""

    backend: str  # "hf", "sglang", "sglang-http", "openai"
    model: str  # model path or served model name, recorded in every row

    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams
    ) -> list[Completion]: ...

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]: ...

    def token_id(self, text: str) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_name(model: ModelConfig, gen: GenerationConfig) -> str:
    """The model generation uses: generation.model, or model.path when that is empty."""
    return gen.model or model.path


def eos_ids(tokenizer: Any, config_eos: int | list[int] | None) -> list[int]:
    """The ids generation stops on: the tokenizer's EOS plus the model's generation-config
    ``eos_token_id`` (one id or a list), as transformers' ``generate`` and SGLang stop."""
    extra = config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted(i for i in {tokenizer.eos_token_id, *extra} if isinstance(i, int))


class BackendError(RuntimeError):
    """A backend failed after its retries (server down, malformed replies...).

    ``server`` names the endpoint; the stage runner adds how many rows were already saved."""

    def __init__(self, message: str, *, server: str = "") -> None:
        self.server = server
        super().__init__(f"{server}: {message}" if server else message)
