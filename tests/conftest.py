import os
from collections.abc import MutableMapping
from pathlib import Path

import pytest
import torch


def default_triton_interpret(env: MutableMapping[str, str], cuda: bool) -> None:
    """Kernels run in Triton's interpreter only where there is no CUDA GPU to compile for;
    with one, `pytest -m gpu` must test the compiled kernels. An explicit setting wins."""
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")


# Triton reads this when @triton.jit is applied: set before any kernel module is imported.
default_triton_interpret(os.environ, torch.cuda.is_available())
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import build_tiny, build_tiny_gemma3  # noqa: E402  (after TRITON_INTERPRET is decided)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        marker = "gpu"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        skip = pytest.mark.skip(reason="Triton interpreter test: set TRITON_INTERPRET=1 to run it")
        marker = "interpreter"
    else:
        return
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (tied embeddings) + BPE tokenizer with a ChatML template."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma-3 (sliding window of 4 tokens on three of four layers) + the BPE
    tokenizer with Gemma's special tokens and chat template."""
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-untied"), tie=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the cache outside the repo."""
    from ssrengine.models.fetch import fetch

    return fetch("smollm2-135m")
