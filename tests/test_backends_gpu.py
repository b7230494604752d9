"""The real SGLang engine and server on SmolLM2 (GPU + the sglang extra; skipped elsewhere).

Greedy outputs are compared with the hf backend in the same dtype (bf16) on the same GPU.
Different attention/GEMM kernels round differently, so a near-tie can flip a token and the
rest of that answer with it: the bar is most answers identical and the first tokens of all,
and judge probabilities within 0.05.

    pytest -m gpu tests/test_backends_gpu.py
"""

from __future__ import annotations

import pytest

from ssrengine.core.config import DataConfig, GenerationConfig, ModelConfig
from ssrengine.data.builtin import resolve_data_file
from ssrengine.data.records import Example, load_examples, prompt_messages
from ssrengine.generation import Completion, Request, SamplingParams, make_generator
from ssrengine.rehearsal.judge import LLMJudge

pytestmark = pytest.mark.gpu
pytest.importorskip("sglang")

N, TOKENS = 16, 32


@pytest.fixture(scope="module")
def data() -> tuple[list[Example], list[Request]]:
    exs = load_examples(resolve_data_file("builtin:train"), max_examples=N)
    system = DataConfig().system_prompt
    return exs, [Request(messages=prompt_messages(e.messages, e.documents, system)) for e in exs]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from ssrengine.generation.hf import HFGenerator

    model = ModelConfig(path=str(smollm2_dir), dtype="bfloat16", device="cuda")
    gen = HFGenerator(model, GenerationConfig(batch_size=N))
    yield gen
    gen.close()


def assert_close_to_hf(got: list[Completion], want: list[Completion]) -> None:
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    assert same >= 0.75 * len(want), f"only {same}/{len(want)} answers identical"
    for g, w in zip(got, want):
        assert g.token_ids[:4] == w.token_ids[:4], (g.text, w.text)
        assert g.finish_reason in ("stop", "length")


def assert_judges_agree(gen, hf, exs: list[Example], cands: list[str]) -> None:
    got, want = LLMJudge(gen).judge_batch(exs, cands), LLMJudge(hf).judge_batch(exs, cands)
    for g, w in zip(got, want):
        assert g.reason.startswith("P(Yes)"), g
        assert abs(g.score - w.score) < 0.05, (g, w)


def test_engine_matches_hf_and_shuts_down(smollm2_dir, hf, data):
    exs, reqs = data
    sampling = SamplingParams(max_new_tokens=TOKENS)
    want = hf.generate(reqs, sampling)
    gen = make_generator(
        ModelConfig(path=str(smollm2_dir), dtype="bfloat16"),
        GenerationConfig(backend="sglang", mem_fraction=0.4),
    )
    with gen:
        assert gen.backend == "sglang"
        assert_close_to_hf(gen.generate(reqs, sampling), want)
        assert_judges_agree(gen, hf, exs, [c.text for c in want])
    assert gen.engine is None


def test_launched_server_over_native_and_openai_routes(smollm2_dir, hf, data):
    exs, reqs = data
    sampling = SamplingParams(max_new_tokens=TOKENS)
    want = hf.generate(reqs, sampling)
    model = ModelConfig(path=str(smollm2_dir), dtype="bfloat16")
    launched = GenerationConfig(
        backend="sglang-http", launch=True, mem_fraction=0.4, batch_size=4, concurrency=2
    )
    with make_generator(model, launched) as gen:
        server = gen.server
        assert server is not None and server.running
        assert_close_to_hf(gen.generate(reqs, sampling), want)
        assert_judges_agree(gen, hf, exs, [c.text for c in want])
        # The same server's OpenAI-compatible route; the served model name is discovered.
        openai = GenerationConfig(backend="openai", url=server.url, batch_size=4)
        with make_generator(model, openai) as oa:
            assert_close_to_hf(oa.generate(reqs, sampling), want)
            LLMJudge(oa).judge_batch(exs, [c.text for c in want])  # logprobs or fallback
    assert not server.running
