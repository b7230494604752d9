"""Generation backends behind one protocol; `make_generator` picks one from the config."""

from __future__ import annotations

from typing import Any

from ssrengine.errors import InputError
from ssrengine.generation.base import BackendError, Completion, Generator, Request, SamplingParams

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
    """Open a backend. ``options`` carries backend-specific settings (tp_size, launch, ...)."""
    if backend == "hf":
        from ssrengine.generation.hf import HFGenerator

        return HFGenerator(
            model,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        )
    raise InputError(
        f"unknown or unavailable generation backend {backend!r}", field="generation.backend"
    )
