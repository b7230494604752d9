"""HFGenerator's own decode loop (finished rows leave the batch and the KV cache) against
transformers' greedy ``model.generate`` on the same left-padded batch, and its logprobs
against a plain forward pass."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.generation import Request, SamplingParams
from ssrengine.generation.hf import HFGenerator
from tests.loopback import build_chatty

QUESTIONS = [
    "What is the capital of France?",
    "Who founded the company?",
    "How many people live in the city?",
    "When was the tower built?",
    "Which river is named?",
    "yes no 1 2 3",
    "the a of to",
    "Paris France capital tower documents",
    "a",
    "Where is the river? Which year was the city built? Who named it?",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chatty(tmp_path_factory.mktemp("chatty"))


def _prompts(gen: HFGenerator) -> list[list[int]]:
    return [gen.tokenize([{"role": "user", "content": q}]) for q in QUESTIONS]


@torch.no_grad()
def _reference(gen: HFGenerator, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy ``model.generate`` on one left-padded batch, cut at the first EOS."""
    pad = gen.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seqs = gen.hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=gen.eos_ids,
        pad_token_id=pad,
    )[:, width:].tolist()
    out = []
    for row in seqs:
        cut = next((j for j, t in enumerate(row) if t in gen.eos_ids), len(row))
        out.append(row[:cut])
    return out


@pytest.mark.parametrize("which", ["tiny", "chatty"])
def test_greedy_equals_model_generate(which, tiny_model_dir, chatty_dir):
    path = tiny_model_dir if which == "tiny" else chatty_dir
    max_new = 24
    gen = HFGenerator(ModelConfig(path=str(path)), GenerationConfig(batch_size=len(QUESTIONS)))
    prompts = _prompts(gen)
    outs = gen.generate([Request(input_ids=p) for p in prompts], SamplingParams(max_new))
    ref = _reference(gen, prompts, max_new)
    assert [o.token_ids for o in outs] == ref
    for o, p, r in zip(outs, prompts, ref):
        assert o.prompt_tokens == len(p)
        assert o.finish_reason == ("length" if len(r) == max_new else "stop")
        assert gen.eos_ids[0] not in o.token_ids
    # one prompt at a time gives the same answers as the batch
    single = [gen.generate([Request(input_ids=p)], SamplingParams(max_new))[0] for p in prompts]
    assert [o.token_ids for o in single] == ref
    if which == "chatty":  # rows end at different steps, some by EOS, some by length
        assert len({len(r) for r in ref}) >= 3
        assert {o.finish_reason for o in outs} == {"stop", "length"}


def test_finished_rows_leave_the_batch(chatty_dir):
    gen = HFGenerator(
        ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=len(QUESTIONS))
    )
    rows: list[int] = []
    hook = gen.hf_model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        outs = gen.generate(
            [Request(input_ids=p) for p in _prompts(gen)], SamplingParams(max_new_tokens=24)
        )
    finally:
        hook.remove()
    # prefill + one decode step per token of the longest answer; each step computes only
    # the rows that have not finished yet
    steps = [len(o.token_ids) + (o.finish_reason == "stop") for o in outs]
    assert rows[0] == len(QUESTIONS)
    assert len(rows) == max(steps)
    assert rows[1:] == [sum(s > k for s in steps) for k in range(1, max(steps))]
    assert sum(rows[1:]) < (len(rows) - 1) * len(QUESTIONS)


def test_logprobs_match_a_forward_pass(chatty_dir):
    gen = HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=4))
    tok = gen.tokenizer
    wanted = tuple(sorted({gen.token_id("Yes"), gen.token_id("No"), gen.eos_ids[0], 5}))
    prompts = _prompts(gen)
    sampling = SamplingParams(max_new_tokens=12, logprob_token_ids=wanted)
    outs = gen.generate([Request(input_ids=p) for p in prompts], sampling)
    for p, o in zip(prompts, outs):
        n = max(1, len(o.token_ids)) if o.finish_reason == "stop" else len(o.token_ids)
        assert len(o.logprobs) == n
        seq = p + o.token_ids + ([gen.eos_ids[0]] if o.finish_reason == "stop" else [])
        with torch.no_grad():
            logits = gen.hf_model(input_ids=torch.tensor([seq])).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + n], dim=-1)
        for j, d in enumerate(o.logprobs):
            assert set(d) == set(wanted)
            for t, v in d.items():
                # A left-padded, KV-cached batched decode against one unpadded forward: the
                # same math in other matmul shapes, so fp32 rounding (seen: 1.0e-5 at -4.67 on
                # transformers 5.25), not a wrong token or position (those differ by > 0.1).
                assert abs(v - float(lp[j, t])) < 5e-5, (tok.decode(p), j, t)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(chatty_dir):
    gen = HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=4))
    reqs = [Request(input_ids=p) for p in _prompts(gen)]
    hot = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = [o.token_ids for o in gen.generate(reqs, hot)]
    b = [o.token_ids for o in gen.generate(reqs, hot)]
    assert a == b
    greedy = [o.token_ids for o in gen.generate(reqs, SamplingParams(max_new_tokens=12))]
    nucleus = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1e-6, seed=3)
    assert [o.token_ids for o in gen.generate(reqs, nucleus)] == greedy
    assert a != greedy  # temperature 1 on a random model does sample


def test_stop_strings_cut_the_text(chatty_dir):
    gen = HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=4))
    reqs = [Request(input_ids=p) for p in _prompts(gen)]
    full = gen.generate(reqs, SamplingParams(max_new_tokens=16))
    o = next(c for c in full if len(c.text) > 3)
    stop = o.text[2:4]
    cut = gen.generate(reqs, SamplingParams(max_new_tokens=16, stop=(stop,)))
    c = cut[full.index(o)]
    assert c.finish_reason == "stop" and stop not in c.text
    assert c.token_ids == o.token_ids


def test_decode_loop_passes_the_kv_cache_under_its_current_name(chatty_dir):
    """transformers 5.x renamed forward's ``past_key_values`` to ``cache`` and warns
    (FutureWarning) on the old name, once per forward of the decode loop."""
    gen = HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=4))
    reqs = [Request(messages=[{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        outs = gen.generate(reqs, SamplingParams(max_new_tokens=4))
    assert [len(o.token_ids) <= 4 for o in outs] == [True] * 4
