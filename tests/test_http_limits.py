"""Hostile or broken servers, for real over HTTP on 127.0.0.1 (tests/loopback.py): a reply that
trickles in is cut at generation.deadline_s, a huge one is not read past
generation.max_reply_bytes, and a reply with token ids outside the vocabulary, too many tokens
or logprobs that are not log-probabilities is one error naming the server and the field, with
nothing of it stored. Credentials in a server URL authenticate but are never shown."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.core.io import read_rows
from ssrengine.generation import BackendError, Request, SamplingParams, make_generator
from ssrengine.generation.hf import HFGenerator
from ssrengine.rehearsal.judge import LLMJudge
from ssrengine.rehearsal.stages import generate_rows
from tests.loopback import Faults, LoopbackServer, build_chatty
from tests.test_backends import examples

REMOTE = ["sglang-http", "openai"]
ROUTE = {"sglang-http": "/generate", "openai": "/v1/completions"}
ASK = [Request(messages=[{"role": "user", "content": "Who founded the company?"}])]
SHORT = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chatty(tmp_path_factory.mktemp("chatty"))


@pytest.fixture(scope="module")
def server_hf(chatty_dir: Path) -> HFGenerator:
    return HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=8))


def _client(backend: str, model: Path, url: str, **kw):
    opts = {"batch_size": 2, "max_retries": 0, "timeout_s": 30.0, **kw}
    gen = GenerationConfig(backend=backend, url=url, **opts)
    return make_generator(ModelConfig(path=str(model)), gen, backoff_s=0.01)


@pytest.mark.parametrize("backend", REMOTE)
def test_a_trickling_reply_is_cut_at_the_deadline(backend, chatty_dir, server_hf):
    # One byte every 50 ms: each read succeeds long before timeout_s (30 s), so only the
    # deadline of the whole request ends it. The retry trickles too.
    faults = Faults(script=["trickle", "trickle"], trickle_s=0.05)
    with LoopbackServer(generator=server_hf, faults=faults) as lb:
        gen = _client(backend, chatty_dir, lb.url, deadline_s=1.0, max_retries=1)
        with gen, pytest.raises(BackendError) as e:
            gen.generate(ASK, SHORT)
        assert lb.requests == 2  # retried like a timeout
    assert "no complete reply within generation.deadline_s=1s" in str(e.value)
    assert str(e.value).startswith(lb.url)


def test_a_trickling_reply_within_the_deadline_is_read(chatty_dir, server_hf):
    faults = Faults(script=["trickle"], trickle_s=0.0005)
    with (
        LoopbackServer(generator=server_hf, faults=faults) as lb,
        _client("openai", chatty_dir, lb.url, deadline_s=60.0) as gen,
    ):
        got = gen.generate(ASK, SHORT)
    assert got == server_hf.generate(ASK, SHORT)


@pytest.mark.parametrize("fault", ["huge", "huge_stream"])
@pytest.mark.parametrize("backend", REMOTE)
def test_a_huge_reply_is_not_read_nor_retried(backend, fault, chatty_dir, server_hf):
    faults = Faults(script=[fault] * 3, huge_bytes=300 << 20)
    with LoopbackServer(generator=server_hf, faults=faults) as lb:
        cap = 1 << 16
        gen = _client(backend, chatty_dir, lb.url, max_reply_bytes=cap, max_retries=2)
        with gen, pytest.raises(BackendError) as e:
            gen.generate(ASK, SHORT)
        assert lb.requests == 1  # the same request would get the same reply
    msg = str(e.value)
    assert f"reply larger than generation.max_reply_bytes={cap}" in msg and "not retried" in msg
    assert "announces 314572800 bytes" in msg if fault == "huge" else "more than 65536" in msg


def _sglang_ids(reply, fn):
    for r in reply:  # the generated ids are the last completion_tokens of output_ids
        new = fn(r["output_ids"])
        r["meta_info"]["completion_tokens"] += len(new) - len(r["output_ids"])
        r["output_ids"] = new
    return reply


def _openai_ids(reply, fn):
    for c in reply["choices"]:
        c["token_ids"] = fn(c["token_ids"])
    return reply


def _ids(backend):
    return _sglang_ids if backend == "sglang-http" else _openai_ids


BAD_IDS = {
    "outside the vocabulary": (lambda ids: [*ids[:-1], 10**6, ids[-1]], "outside the vocabulary"),
    "negative id": (lambda ids: [*ids[:-1], -1, ids[-1]], "outside the vocabulary"),
    "too many tokens": (lambda ids: ids + [ids[-1]] * 40, "tokens, more than the 7 asked for"),
}


@pytest.mark.parametrize("kind", BAD_IDS)
@pytest.mark.parametrize("backend", REMOTE)
def test_bad_token_ids_are_named_and_nothing_is_stored(
    backend, kind, chatty_dir, server_hf, tmp_path
):
    change, fragment = BAD_IDS[kind]
    field = "output_ids" if backend == "sglang-http" else "token_ids"
    calls = []

    def tamper(path, reply):  # the first batch is answered honestly, the second is not
        calls.append(path)
        return reply if len(calls) == 1 else _ids(backend)(reply, change)

    exs = examples(4)
    out = tmp_path / "gen.jsonl"
    with (
        LoopbackServer(generator=server_hf, faults=Faults(tamper=tamper)) as lb,
        _client(backend, chatty_dir, lb.url, concurrency=1) as gen,
        pytest.raises(BackendError) as e,
    ):
        generate_rows(_cfg(backend, chatty_dir, lb.url), tmp_path, exs, gen, path=out)
    msg = str(e.value)
    assert msg.startswith(lb.url) and "malformed reply: field '" in msg
    assert field in msg and fragment in msg
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["ex-00", "ex-01"]  # the honest batch only
    assert all(max(r["token_ids"], default=0) < len(server_hf.tokenizer) for r in rows)


def _cfg(backend, model, url):
    from ssrengine.core.config_load import build_config

    return build_config(
        {
            "model": {"path": str(model), "device": "cpu"},
            "generation": {
                "backend": backend,
                "url": url,
                "max_new_tokens": 6,
                "batch_size": 2,
                "concurrency": 1,
            },
        }
    )


def _sglang_logprobs(reply, value):
    for r in reply:
        for step in r["meta_info"].get("output_token_ids_logprobs") or []:
            for entry in step:
                entry[0] = value
    return reply


def _openai_logprobs(reply, value):
    for c in reply["choices"]:
        for top in c["logprobs"]["top_logprobs"]:
            for k in top:
                top[k] = value
    return reply


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.5])
@pytest.mark.parametrize("backend", REMOTE)
def test_judge_logprobs_must_be_log_probabilities(backend, value, chatty_dir, server_hf):
    change = _sglang_logprobs if backend == "sglang-http" else _openai_logprobs
    faults = Faults(tamper=lambda path, reply: change(reply, value))
    ex = examples(1)
    with (
        LoopbackServer(generator=server_hf, faults=faults) as lb,
        _client(backend, chatty_dir, lb.url) as gen,
        pytest.raises(BackendError) as e,
    ):
        LLMJudge(gen).judge_batch(ex, ["Paris."])
    msg = str(e.value)
    assert msg.startswith(lb.url) and "is not a log-probability (finite, <= 0)" in msg
    assert "logprobs" in msg and repr(value) in msg


def test_credentials_in_the_url_authenticate_and_are_never_shown(
    chatty_dir, server_hf, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    with LoopbackServer(generator=server_hf, faults=Faults(script=["500", "500"])) as lb:
        url = lb.url.replace("http://", "http://alice:s3cret@")
        gen = _client("openai", chatty_dir, url, max_retries=1)
        with gen, pytest.raises(BackendError) as e:
            gen.generate(ASK, SHORT)
        # HTTP Basic, as a browser or curl sends the URL's credentials
        assert lb.auth[-1] == "Basic YWxpY2U6czNjcmV0"
    assert "s3cret" not in str(e.value) and "s3cret" not in caplog.text
    assert str(e.value).startswith("http://***@127.0.0.1:")
    assert "retry 1/1" in caplog.text  # the retry was logged, redacted

    cfg = _cfg("openai", chatty_dir, url)
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["generation"]["url"] == url.replace("alice:s3cret", "***")
