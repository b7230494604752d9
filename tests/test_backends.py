"""Server backends against the loopback server (tests/loopback.py): same outputs as the hf
backend, judge logprobs, retries under injected faults, bounded concurrency, round-robin, and
a generate stage that survives a killed server and resumes with every row exactly once."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.core.config_load import build_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import GENERATIONS, VERDICTS
from ssrengine.data.records import Example
from ssrengine.generation import (
    BackendError,
    Request,
    SamplingParams,
    generation_config,
    make_generator,
)
from ssrengine.generation.hf import HFGenerator
from ssrengine.generation.http import MalformedReply, parse_urls
from ssrengine.generation.launch import free_port
from ssrengine.generation.sglang_http import parse_sglang_outputs
from ssrengine.rehearsal.judge import LLMJudge
from ssrengine.rehearsal.stages import generate_rows, judge_rows
from tests.loopback import Faults, LoopbackServer, build_chatty

REMOTE = ["sglang-http", "openai"]
QUESTIONS = [
    "What is the capital of France?",
    "Who founded the company?",
    "How many people live in the city?",
    "When was the tower built?",
    "Which river is named?",
    "yes no 1 2 3",
    "the a of to",
    "Paris France capital tower documents",
]
GREEDY = SamplingParams(max_new_tokens=16)
SHORT = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A model this small is fastest on one thread; on a busy 2-core machine two threads
    contend and a batch of 8 takes seconds instead of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chatty(tmp_path_factory.mktemp("chatty"))


@pytest.fixture(scope="module")
def hf(chatty_dir: Path) -> HFGenerator:
    """The reference: the local hf backend."""
    return HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=4))


@pytest.fixture(scope="module")
def server_hf(chatty_dir: Path) -> HFGenerator:
    """The loopback's own model instance (servers are restarted around it)."""
    return HFGenerator(ModelConfig(path=str(chatty_dir)), GenerationConfig(batch_size=8))


@pytest.fixture(scope="module")
def ref(hf: HFGenerator) -> dict[str, list]:
    """hf outputs, computed once: greedy on all questions, short on the first four."""
    return {
        "greedy": hf.generate(requests(), GREEDY),
        "short": hf.generate(requests(4), SHORT),
    }


@pytest.fixture
def loopback(server_hf: HFGenerator):
    with LoopbackServer(generator=server_hf) as lb:
        yield lb


def remote(backend: str, model: Path, url: str, served_model: str = "", **kw):
    opts = {"batch_size": 2, "concurrency": 2, "max_retries": 2, **kw}
    gen = GenerationConfig(backend=backend, url=url, **opts)
    extra = {"served_model": served_model} if served_model else {}
    return make_generator(ModelConfig(path=str(model)), gen, backoff_s=0.01, **extra)


def requests(n: int = len(QUESTIONS)) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": q}]) for q in (QUESTIONS * 4)[:n]]


def examples(n: int) -> list[Example]:
    qs = (QUESTIONS * 4)[:n]
    return [
        Example(id=f"ex-{i:02d}", messages=[{"role": "user", "content": q}], response="Paris.")
        for i, q in enumerate(qs)
    ]


# -- same outputs as the hf backend ---------------------------------------------------------


@pytest.mark.parametrize("backend", REMOTE)
def test_greedy_outputs_equal_hf(backend, chatty_dir, ref, loopback):
    want = ref["greedy"]
    assert {c.finish_reason for c in want} == {"stop", "length"}  # both paths are exercised
    with remote(backend, chatty_dir, loopback.url, batch_size=3) as gen:
        got = gen.generate(requests(), GREEDY)
        assert gen.backend == backend and gen.model == str(chatty_dir)
    assert got == want


@pytest.mark.parametrize("backend", REMOTE)
def test_stop_strings_end_the_text_like_hf(backend, chatty_dir, hf, ref, loopback):
    base = ref["greedy"]
    stop = next(c.text[2:4] for c in base if len(c.text) > 6)
    sampling = SamplingParams(max_new_tokens=16, stop=(stop,))
    want = hf.generate(requests(), sampling)
    with remote(backend, chatty_dir, loopback.url) as gen:
        got = gen.generate(requests(), sampling)
    # The server stops generating at the stop string; hf only cuts the text.
    assert [(c.text, c.finish_reason) for c in got] == [(c.text, c.finish_reason) for c in want]
    assert any(stop in c.text for c in base) and not any(stop in c.text for c in got)


@pytest.mark.parametrize("backend", REMOTE)
def test_token_id_prompts_and_empty_batches(backend, chatty_dir, hf, loopback):
    ids = [hf.tokenize([{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    reqs = [Request(input_ids=x) for x in ids]
    with remote(backend, chatty_dir, loopback.url, batch_size=1) as gen:
        assert gen.generate(reqs, GREEDY) == hf.generate(reqs, GREEDY)
        assert gen.generate([], GREEDY) == []
        assert gen.tokenize([{"role": "user", "content": "hi"}]) == hf.tokenize(
            [{"role": "user", "content": "hi"}]
        )
        assert gen.token_id("Yes") == hf.token_id("Yes")


# -- the LLM judge --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", REMOTE)
def test_llm_judge_scores_equal_hf(backend, chatty_dir, hf, ref, loopback):
    exs = examples(8)
    cands = [c.text for c in ref["greedy"]]
    want = LLMJudge(hf).judge_batch(exs, cands)
    with remote(backend, chatty_dir, loopback.url) as gen:
        judge = LLMJudge(gen)
        got = judge.judge_batch(exs, cands)
        step = gen.generate(requests(2), SamplingParams(max_new_tokens=1, logprob_token_ids=(5, 7)))
    assert all(w.reason.startswith("P(Yes)") for w in want)
    assert [g.accept for g in got] == [w.accept for w in want]
    for g, w in zip(got, want):
        assert g.reason.startswith("P(Yes)")
        assert math.isclose(g.score, w.score, abs_tol=1e-5), (g, w)
    assert all(len(c.logprobs) == 1 and set(c.logprobs[0]) == {5, 7} for c in step)


def test_sglang_logprobs_cover_every_kept_token(chatty_dir, hf, loopback):
    sampling = SamplingParams(max_new_tokens=16, logprob_token_ids=(5, 7))
    want = hf.generate(requests(), sampling)
    with remote("sglang-http", chatty_dir, loopback.url) as gen:
        got = gen.generate(requests(), sampling)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.logprobs)
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.keys() == b.keys()
            assert all(math.isclose(a[t], b[t], abs_tol=1e-4) for t in a)


def test_openai_judge_falls_back_when_yes_no_are_not_in_top_k(chatty_dir, hf, loopback):
    """A server that ignores logit_bias: Yes/No are rarely in a random model's top-5, so
    logprobs stay empty there and the judge reads the text instead (constrained choice)."""
    loopback.faults.ignore_logit_bias = True
    exs = examples(8)
    with remote("openai", chatty_dir, loopback.url) as gen:
        yes, no = gen.token_id("Yes"), gen.token_id("No")
        outs = gen.generate(
            [Request(messages=[{"role": "user", "content": q}]) for q in QUESTIONS],
            SamplingParams(max_new_tokens=1, logprob_token_ids=(yes, no)),
        )
        verdicts = LLMJudge(gen).judge_batch(exs, ["Paris."] * 8)
    assert any(c.logprobs == [] for c in outs)
    fallback = [v for v in verdicts if not v.reason.startswith("P(Yes)")]
    assert fallback and all(v.score in (0.0, 1.0) for v in fallback)


# -- fault tolerance ------------------------------------------------------------------------


FAULTS = ["500", "503", "drop", "hang", "garbage", "short", "abort"]


# "abort" is SGLang's finish_reason; OpenAI replies have no such thing.
@pytest.mark.parametrize(
    ("backend", "fault"),
    [(b, f) for b in REMOTE for f in FAULTS if not (b == "openai" and f == "abort")],
)
def test_a_failed_request_is_retried(backend, fault, chatty_dir, ref, loopback):
    loopback.faults = Faults(script=[fault], hang_s=2.0)
    with remote(backend, chatty_dir, loopback.url, timeout_s=0.5) as gen:
        assert gen.generate(requests(4), SHORT) == ref["short"]
    assert loopback.requests == 2 + 1  # 2 batches + 1 retry


def test_persistent_failure_names_the_server(chatty_dir, loopback):
    loopback.faults = Faults(script=["500"] * 10)
    with (
        remote("sglang-http", chatty_dir, loopback.url, batch_size=8) as gen,
        pytest.raises(BackendError) as e,
    ):
        gen.generate(requests(), GREEDY)
    msg = str(e.value)
    assert e.value.server == loopback.url and msg.startswith(loopback.url)
    assert "failed after 3 attempt(s)" in msg and "HTTP 500" in msg
    assert loopback.requests == 3


def test_a_bad_request_is_not_retried(chatty_dir, loopback):
    loopback.faults = Faults(script=["400"])
    with (
        remote("sglang-http", chatty_dir, loopback.url, batch_size=8) as gen,
        pytest.raises(BackendError, match=r"HTTP 400 \(not retried"),
    ):
        gen.generate(requests(), GREEDY)
    assert loopback.requests == 1


def test_openai_unknown_model_is_a_clear_error(chatty_dir, loopback):
    with (
        remote("openai", chatty_dir, loopback.url, served_model="nope") as gen,
        pytest.raises(BackendError, match=r"HTTP 404.*does not exist"),
    ):
        gen.generate(requests(1), GREEDY)


def test_no_server_is_connection_refused(chatty_dir):
    url = f"http://127.0.0.1:{free_port()}"
    with (
        remote("sglang-http", chatty_dir, url, max_retries=1) as gen,
        pytest.raises(BackendError, match="connection refused") as e,
    ):
        gen.generate(requests(1), GREEDY)
    assert e.value.server == url


def test_at_most_concurrency_requests_in_flight(chatty_dir, loopback):
    loopback.faults = Faults(script=["slow"] * 8, slow_s=0.3)
    with remote("sglang-http", chatty_dir, loopback.url, batch_size=1, concurrency=3) as gen:
        gen.generate(requests(8), SamplingParams(max_new_tokens=2))
    assert loopback.requests == 8
    # The bound is the guarantee; reaching it depends on thread timing on a busy machine.
    assert 2 <= loopback.max_inflight <= 3, loopback.max_inflight


def test_round_robin_over_servers_and_past_a_dead_one(chatty_dir, ref, server_hf, loopback):
    with LoopbackServer(generator=server_hf) as other:
        urls = f"{loopback.url},{other.url}"
        with remote("sglang-http", chatty_dir, urls, batch_size=1, concurrency=1) as gen:
            assert gen.generate(requests(4), SHORT) == ref["short"]
        assert loopback.requests == other.requests == 2
        dead = f"http://127.0.0.1:{free_port()}"
        with remote("sglang-http", chatty_dir, f"{dead},{other.url}", batch_size=1) as gen:
            assert gen.generate(requests(4), SHORT) == ref["short"]


# -- resumable stages against a server that dies --------------------------------------------


def _stage_config(model: Path, url: str, backend: str = "sglang-http"):
    return build_config(
        {
            "model": {"path": str(model)},
            "generation": {
                "backend": backend,
                "url": url,
                "batch_size": 2,
                "concurrency": 2,
                "max_new_tokens": 12,
                "max_retries": 2,
                "timeout_s": 5.0,
            },
            "judge": {"kind": "llm", "batch_size": 4},
        }
    )


def _open(cfg):
    """stages.open_generator, with a short backoff so the test is quick."""
    return make_generator(cfg.model, generation_config(cfg), backoff_s=0.01)


def test_generate_stage_survives_a_killed_server(tmp_path, chatty_dir, hf, server_hf):
    exs = examples(12)
    lb = LoopbackServer(generator=server_hf, faults=Faults(kill_after=3))
    cfg = _stage_config(chatty_dir, lb.url)
    try:
        with _open(cfg) as gen, pytest.raises(BackendError) as e:
            generate_rows(cfg, tmp_path / "run", exs, gen)
    finally:
        lb.stop()
    msg = str(e.value)
    # chunks of batch_size * concurrency = 4 rows: the first is saved, the second died
    assert lb.url in msg and "4/12 rows are saved" in msg and "resumes" in msg
    assert len(read_rows(tmp_path / "run" / GENERATIONS)) == 4

    with LoopbackServer(generator=server_hf, port=lb.port) as lb2, _open(cfg) as gen:
        rows = generate_rows(cfg, tmp_path / "run", exs, gen)
        assert lb2.requests == 4  # only the 8 missing rows, 2 per request
    on_disk = read_rows(tmp_path / "run" / GENERATIONS)
    assert sorted(r["id"] for r in on_disk) == sorted(e.id for e in exs)  # each exactly once

    ref = generate_rows(_stage_config(chatty_dir, "", "hf"), tmp_path / "hf", exs, hf)
    fields = ("response", "token_ids", "finish_reason")
    assert {i: [getattr(r, f) for f in fields] for i, r in rows.items()} == {
        i: [getattr(r, f) for f in fields] for i, r in ref.items()
    }
    assert {r["backend"] for r in on_disk} == {"sglang-http"}


def test_judge_stage_over_sglang_http_matches_hf(tmp_path, chatty_dir, hf, ref, loopback):
    exs = examples(8)
    cands = {e.id: c.text for e, c in zip(exs, ref["greedy"])}
    cfg = _stage_config(chatty_dir, loopback.url)
    loopback.faults = Faults(script=["drop", "500"])
    with _open(cfg) as gen:
        got = judge_rows(cfg, tmp_path / "a", exs, cands, LLMJudge(gen))
    want = judge_rows(cfg, tmp_path / "b", exs, cands, LLMJudge(hf))
    assert got.keys() == want.keys()
    for i in got:
        assert got[i].accept == want[i].accept
        assert math.isclose(got[i].score, want[i].score, abs_tol=1e-5)
    assert len(read_rows(tmp_path / "a" / VERDICTS)) == 8


# -- a server process: launch, health, stop, a real crash -----------------------------------


def test_server_process_lifecycle_and_a_crash_mid_stage(chatty_dir, ref):
    from ssrengine.generation.launch import ServerProcess

    port = free_port()
    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "tests.loopback", "--model", str(chatty_dir), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(
        cmd + ["--exit-after", "2"], url, name="loopback", env={"PYTHONPATH": root}
    ) as server:
        with remote("sglang-http", chatty_dir, url, batch_size=2, concurrency=1) as gen:
            assert gen.generate(requests(4), SHORT) == ref["short"]
            with pytest.raises(BackendError, match=r"connection (dropped|refused)") as e:
                gen.generate(requests(4), SHORT)  # the process exits on request 3
        assert e.value.server == url
        server.proc.wait(10)
        assert not server.running
    assert server.proc.returncode == 3


def test_server_process_that_dies_at_startup_shows_its_log():
    from ssrengine.generation.launch import ServerProcess

    cmd = [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(7)"]
    with pytest.raises(BackendError, match=r"exited with code 7(.|\n)*no GPU here"):
        ServerProcess(cmd, f"http://127.0.0.1:{free_port()}", name="sglang")


def test_server_process_stop_ends_it(chatty_dir):
    from ssrengine.generation.launch import ServerProcess

    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    port = free_port()
    with LoopbackServer(chatty_dir, port=port):  # something healthy on the port
        server = ServerProcess(cmd, f"http://127.0.0.1:{port}", name="sleeper")
        assert server.running
        server.stop(timeout_s=5)
    assert not server.running and server.proc.returncode == -15


# -- configuration and parsing --------------------------------------------------------------


def test_make_generator_validates_its_inputs(chatty_dir):
    model = ModelConfig(path=str(chatty_dir))
    with pytest.raises(InputError, match="unknown generation backend"):
        make_generator(model, GenerationConfig(backend="vllm"))
    with pytest.raises(InputError, match=r"generation\.url"):
        make_generator(model, GenerationConfig(backend="sglang-http"))
    with pytest.raises(InputError, match=r"generation\.url"):
        make_generator(model, GenerationConfig(backend="openai", url="ftp://x"))
    with pytest.raises(InputError, match="not both"):
        launch = GenerationConfig(backend="sglang-http", url="http://127.0.0.1:1", launch=True)
        make_generator(model, launch)
    assert parse_urls(" http://a:1/, http://b:2 ,") == ["http://a:1", "http://b:2"]


def test_sglang_is_optional(chatty_dir):
    pytest.importorskip("torch")
    try:
        import sglang  # noqa: F401

        pytest.skip("sglang is installed")
    except ImportError:
        pass
    model = ModelConfig(path=str(chatty_dir))
    with pytest.raises(InputError, match=r"ssrengine\[sglang\]"):
        make_generator(model, GenerationConfig(backend="sglang"))
    with pytest.raises(InputError, match=r"ssrengine\[sglang\]"):
        make_generator(model, GenerationConfig(backend="sglang-http", launch=True))


def test_sglang_command_carries_the_config(chatty_dir):
    from ssrengine.generation.launch import sglang_command

    cmd = sglang_command(
        str(chatty_dir), port=31000, tp_size=2, dp_size=4, mem_fraction=0.7, dtype="float32"
    )
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {
        "--model-path": str(chatty_dir),
        "--host": "127.0.0.1",
        "--port": "31000",
        "--tp-size": "2",
        "--dp-size": "4",
        "--mem-fraction-static": "0.7",
        "--dtype": "bfloat16",  # SGLang's "auto" would serve an fp32 checkpoint in fp16
    }


def _reply(ids, reason, prompt_tail=(), **meta):
    """A /generate result; output_ids start with `prompt_tail` as SGLang's do (see loopback)."""
    meta = {"finish_reason": reason, "completion_tokens": len(ids), **meta}
    return {"text": " hi ", "output_ids": [*prompt_tail, *ids], "meta_info": meta}


def test_parse_sglang_reply_shapes():
    s = SamplingParams(max_new_tokens=16)
    [c] = parse_sglang_outputs([_reply([5, 6, 2], {"type": "stop", "matched": 2})], 1, s)
    assert (c.text, c.token_ids, c.finish_reason) == ("hi", [5, 6], "stop")
    [c] = parse_sglang_outputs([_reply([5, 6], {"type": "stop", "matched": "x"})], 1, s)
    assert c.token_ids == [5, 6]
    [c] = parse_sglang_outputs([_reply([5], {"type": "length", "length": 1})], 1, s)
    assert c.finish_reason == "length"
    tail = [101, 102, 103, 104, 105]  # the last 5 prompt tokens, as SGLang 0.5.x returns them
    [c] = parse_sglang_outputs([_reply([5, 6, 2], {"type": "stop", "matched": 2}, tail)], 1, s)
    assert c.token_ids == [5, 6]
    judge = SamplingParams(max_new_tokens=1, logprob_token_ids=(5, 9))
    steps = [[[-0.5, 5, None], [-2.0, 9, None]]]
    [c] = parse_sglang_outputs(
        [_reply([2], {"type": "stop", "matched": 2}, output_token_ids_logprobs=steps)], 1, judge
    )
    assert c.token_ids == [] and c.logprobs == [{5: -0.5, 9: -2.0}]
    bad = [
        [_reply([5], {"type": "abort", "message": "oom"})],
        [_reply([5], {"type": "length"}, output_token_ids_logprobs=[[[-1.0, 5, None]]])],
        [_reply([5], {"type": "length"}, completion_tokens=3)],  # more than output_ids
        [],
    ]
    for obj in bad:
        with pytest.raises((MalformedReply, KeyError)):
            parse_sglang_outputs(obj, 1, judge)


def test_sglang_can_run_from_another_environment(chatty_dir, tmp_path):
    """generation.launch_python: the server command runs that interpreter (SGLang in its own
    environment); one that is not executable is refused before anything starts."""
    from ssrengine.generation.launch import launch_sglang, sglang_command

    cmd = sglang_command(str(chatty_dir), port=31000, python="/opt/sglang/bin/python")
    assert cmd[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    missing = str(tmp_path / "no-such-python")
    with pytest.raises(InputError, match=r"generation\.launch_python"):
        launch_sglang(str(chatty_dir), python=missing)
    with pytest.raises(InputError, match=r"generation\.launch_python"):
        make_generator(
            ModelConfig(path=str(chatty_dir)),
            GenerationConfig(backend="sglang-http", launch=True, launch_python=missing),
        )
