"""A loopback inference server for tests: SGLang's native ``POST /generate`` and the
OpenAI-compatible ``POST /v1/completions``, with their documented request and reply shapes,
answered by a tiny HF model through `HFGenerator` (real model output), plus fault injection.

Shapes followed (SGLang 0.5: io_struct.GenerateReqInput, tokenizer_manager, detokenizer):
- request: ``text`` or ``input_ids`` (one prompt or a batch), ``sampling_params`` (a dict or one
  per prompt; unknown keys are rejected with 400, as SGLang's SamplingParams(**d) does),
  ``return_logprob``, ``top_logprobs_num``, ``token_ids_logprob``, ``return_text_in_logprobs``.
- reply: ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
  "completion_tokens", "cached_tokens", "e2e_latency", "output_token_logprobs"?,
  "output_top_logprobs"?, "output_token_ids_logprobs"?}}`` (a list for a batch). finish_reason is
  ``{"type": "stop", "matched": token id | stop string}`` or ``{"type": "length", "length": n}``;
  ``output_ids`` keep the matched stop token, ``text`` does not (the detokenizer trims text only),
  and begin with the last 5 prompt tokens (SGLang's incremental-detokenization context: its
  generated ids are the last ``completion_tokens`` of them).
  Generation ends at the token that completes a stop string. Logprob entries are
  ``[logprob, token_id, text | null]``, one list per generated position.
- OpenAI: ``{"model", "prompt": str | [str] | [int] | [[int]], "max_tokens", "temperature",
  "top_p", "n", "stop", "seed", "logprobs", "logit_bias"}`` → ``{"id", "object":
  "text_completion", "created", "model", "choices": [{"index", "text", "logprobs": {"tokens",
  "token_logprobs", "top_logprobs", "text_offset"} | null, "finish_reason"}], "usage"}``, with
  vLLM's ``return_token_ids`` extension (``choices[].token_ids``, EOS included). logit_bias is
  applied before the reported logprobs (OpenAI's semantics), for ``max_tokens == 1`` only.

Logprobs are computed by a teacher-forced forward pass over prompt + output (full vocabulary),
so they agree with the hf backend's up to float rounding. Not implemented (400): streaming,
n > 1, echo, and sampling options other than temperature/top_p/stop.

Faults (``server.faults.script``, one entry per generation request, then "ok"): "500", "503",
"400", "drop" (close the connection without a reply), "hang" (reply nothing for ``hang_s``),
"garbage" (200 with invalid JSON), "short" (a batch reply missing its last result), "abort"
(SGLang finish_reason abort), "slow" (answer after ``slow_s``), "trickle" (the whole reply,
status line included, one byte every ``trickle_s``), "huge" (200 announcing ``huge_bytes`` in
Content-Length), "huge_stream" (200 without a length: ``huge_bytes`` of zeros until the client
hangs up). ``tamper(path, reply)`` rewrites every answered reply (a hostile or broken server:
bad token ids, NaN logprobs). ``kill_after = N``: the request after the N-th kills the server
(in-flight replies are dropped, the port closes). ``auth`` records each request's Authorization
header (None without one).

Binds 127.0.0.1 only. Standalone: ``python -m tests.loopback --model DIR [--port N]
[--exit-after N]`` (``--exit-after``: the process exits on the request after the N-th).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.generation.base import Request, SamplingParams
from ssrengine.generation.hf import HFGenerator

# SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens its output_ids start with.
SGLANG_DETOKENIZATION_OFFSET = 5


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Faults:
    script: list[str] = field(default_factory=list)
    kill_after: int | None = None
    exit_after: int | None = None
    hang_s: float = 3.0
    slow_s: float = 0.2
    ignore_logit_bias: bool = False  # behave like a server without logit_bias support
    trickle_s: float = 0.05
    huge_bytes: int = 300 << 20
    tamper: Callable[[str, Any], Any] | None = None


@dataclass(frozen=True)
class _Params:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass
class _Out:
    prompt: list[int]
    ids: list[int]  # generated ids, the matched stop token included
    text: str
    finish: dict[str, Any]
    lp: torch.Tensor | None = None  # (len(ids), V) log-probs of every position, when asked


SGLANG_SAMPLING = {  # SGLang SamplingParams fields → the value that makes them a no-op
    "max_new_tokens": None,
    "temperature": None,
    "top_p": None,
    "stop": None,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop_token_ids": None,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "no_stop_trim": False,
    "n": 1,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "custom_params": None,
    "sampling_seed": None,
}
SGLANG_REQUEST = {
    "text",
    "input_ids",
    "sampling_params",
    "rid",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "token_ids_logprob",
    "return_text_in_logprobs",
    "stream",
}
OPENAI_REQUEST = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "logprobs",
    "echo",
    "seed",
    "logit_bias",
    "user",
    "return_token_ids",
}


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest(f"stop must be a string or a list of strings, got {stop!r}")


class LoopbackServer:
    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        generator: HFGenerator | None = None,
        port: int = 0,
        served_model: str = "loopback-model",
        faults: Faults | None = None,
    ) -> None:
        self.hf = generator or HFGenerator(
            ModelConfig(path=str(model_dir)), GenerationConfig(batch_size=8)
        )
        self.tok = self.hf.tokenizer
        if len(self.hf.eos_ids) != 1:
            raise ValueError("the loopback serves models with exactly one EOS id")
        self.eos = self.hf.eos_ids[0]
        self.served_model = served_model
        self.faults = faults or Faults()
        self.requests = 0  # generation requests received
        self.auth: list[str | None] = []  # each request's Authorization header
        self.inflight = self.max_inflight = 0
        self.dead = False
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.loopback = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def kill(self) -> None:
        """A crash: in-flight replies are dropped and the port closes."""
        self.dead = True
        threading.Thread(target=self.stop, daemon=True).start()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- bookkeeping ------------------------------------------------------------------------
    def begin(self) -> str:
        with self._lock:
            self.requests += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            f = self.faults
            if f.exit_after is not None and self.requests > f.exit_after:
                os._exit(3)
            if f.kill_after is not None and self.requests > f.kill_after:
                return "kill"
            return f.script.pop(0) if f.script else "ok"

    def end(self) -> None:
        with self._lock:
            self.inflight -= 1

    # -- the model --------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, prompt: list[int], out: list[int], extra: int = 0) -> torch.Tensor:
        """(len(out) + extra, V): log-probs of the next token at each generated position."""
        seq = torch.tensor([prompt + out], device=self.hf.device)
        with self._model_lock:
            logits = self.hf.hf_model(input_ids=seq, use_cache=False).logits[0]
        start = len(prompt) - 1
        return torch.log_softmax(logits[start : start + len(out) + extra].float(), dim=-1)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def complete(self, prompts: list[list[int]], p: _Params, logprobs: bool) -> list[_Out]:
        if p.logit_bias:
            return [self._biased_step(prompt, p) for prompt in prompts]
        # Stop strings are applied below as SGLang applies them; hf runs without them.
        sampling = SamplingParams(
            max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed
        )
        with self._model_lock:
            comps = self.hf.generate([Request(input_ids=x) for x in prompts], sampling)
        outs = []
        for prompt, c in zip(prompts, comps):
            ids = list(c.token_ids)
            finish: dict[str, Any] = {"type": "length", "length": len(ids)}
            if c.finish_reason == "stop":
                finish = {"type": "stop", "matched": self.eos}
            cut = self._stop_cut(ids, p.stop)
            if cut is not None:
                ids, s = ids[: cut[0]], cut[1]
                text = self._decode(ids)
                out = _Out(prompt, ids, text[: text.find(s)], {"type": "stop", "matched": s})
            else:
                text = self._decode(ids)
                if finish["type"] == "stop":
                    ids.append(self.eos)
                out = _Out(prompt, ids, text, finish)
            if logprobs:
                out.lp = self._logprobs(prompt, out.ids)
            outs.append(out)
        return outs

    def _stop_cut(self, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
        """(k, s): the first k tokens whose text contains stop string s (generation ends there)."""
        for k in range(1, len(ids) + 1):
            text = self._decode(ids[:k])
            for s in stops:
                if s in text:
                    return k, s
        return None

    def _biased_step(self, prompt: list[int], p: _Params) -> _Out:
        lp = self._logprobs(prompt, [], extra=1)[0]
        for t, b in p.logit_bias:
            lp[t] += b
        lp = torch.log_softmax(lp, dim=-1)
        if p.temperature <= 0:
            t = int(lp.argmax())
        else:
            gen = torch.Generator().manual_seed(p.seed)
            t = int(torch.multinomial((lp / p.temperature).softmax(-1), 1, generator=gen))
        finish = (
            {"type": "stop", "matched": t} if t == self.eos else {"type": "length", "length": 1}
        )
        return _Out(prompt, [t], self._decode([t]) if t != self.eos else "", finish, lp[None])

    # -- SGLang /generate -------------------------------------------------------------------
    def sglang_generate(self, req: dict[str, Any], fault: str) -> Any:
        unknown = set(req) - SGLANG_REQUEST
        if unknown:
            raise BadRequest(f"GenerateReqInput got unexpected fields {sorted(unknown)}")
        if ("text" in req) == ("input_ids" in req):
            raise BadRequest("Either text or input_ids should be provided.")
        if req.get("stream"):
            raise BadRequest("the loopback does not stream")
        if "text" in req:
            single = isinstance(req["text"], str)
            texts = [req["text"]] if single else req["text"]
            prompts = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            ids = req["input_ids"]
            if not isinstance(ids, list) or not ids:
                raise BadRequest("input_ids must be a non-empty list")
            single = isinstance(ids[0], int)
            prompts = [ids] if single else ids
        n = len(prompts)

        def per(name: str, default: Any, nested: bool = False) -> list[Any]:
            v = req.get(name)
            if v is None:
                return [default] * n
            if nested:  # token_ids_logprob: [ids] for all, or [[ids], ...] per prompt
                return [v] * n if not v or not isinstance(v[0], list) else list(v)
            return list(v) if isinstance(v, list) else [v] * n

        sps = per("sampling_params", {})
        want = per("return_logprob", False)
        tops = per("top_logprobs_num", 0)
        ids_lp = per("token_ids_logprob", None, nested=True)
        with_text = bool(req.get("return_text_in_logprobs"))
        if not all(len(x) == n for x in (sps, want, tops, ids_lp)):
            raise BadRequest("per-prompt lists must have one entry per prompt")
        params = [self._sglang_params(sp) for sp in sps]
        t0 = time.perf_counter()
        outs: list[_Out | None] = [None] * n
        for p in dict.fromkeys(params):  # one hf call per distinct sampling setting
            idx = [i for i in range(n) if params[i] == p]
            lp = any(want[i] for i in idx)
            for i, o in zip(idx, self.complete([prompts[i] for i in idx], p, lp)):
                outs[i] = o
        dt = time.perf_counter() - t0
        results = []
        for i, o in enumerate(outs):
            assert o is not None
            meta: dict[str, Any] = {
                "id": uuid.uuid4().hex,
                "finish_reason": o.finish,
                "prompt_tokens": len(o.prompt),
                "completion_tokens": len(o.ids),
                "cached_tokens": 0,
                "e2e_latency": dt,
            }
            if want[i] and o.lp is not None:
                self._sglang_logprobs(meta, o, tops[i], ids_lp[i], with_text)
            # SGLang 0.5.x answers output_ids=recv_obj.decode_ids (python/sglang/srt/managers/
            # detokenizer_manager.py, handle_batch_token_id_out), which begin
            # INIT_INCREMENTAL_DETOKENIZATION_OFFSET = 5 tokens before the end of the prompt
            # (schedule_batch.py, Req.init_incremental_detokenize; sgl-project/sglang#17240).
            surr = o.prompt[max(len(o.prompt) - SGLANG_DETOKENIZATION_OFFSET, 0) :]
            results.append({"text": o.text, "output_ids": surr + o.ids, "meta_info": meta})
        if fault == "abort":
            results[0]["meta_info"]["finish_reason"] = {
                "type": "abort",
                "message": "injected abort",
                "err_type": 522,
            }
        if fault == "short":
            return results[:-1] if not single else {"text": results[0]["text"]}
        return results[0] if single else results

    def _sglang_params(self, sp: dict[str, Any]) -> _Params:
        if not isinstance(sp, dict):
            raise BadRequest("sampling_params must be an object")
        unknown = set(sp) - set(SGLANG_SAMPLING)
        if unknown:
            raise BadRequest(f"SamplingParams.__init__() got unexpected keyword {sorted(unknown)}")
        for k, noop in SGLANG_SAMPLING.items():
            if noop is not None and k in sp and sp[k] != noop:
                raise BadRequest(f"the loopback does not implement sampling_params.{k}")
        for k in ("stop_token_ids", "json_schema", "regex", "ebnf", "structural_tag"):
            if sp.get(k) is not None:
                raise BadRequest(f"the loopback does not implement sampling_params.{k}")
        return _Params(
            max_new_tokens=int(sp.get("max_new_tokens", 128)),
            temperature=float(sp.get("temperature", 1.0)),
            top_p=float(sp.get("top_p", 1.0)),
            stop=_stops(sp.get("stop")),
            seed=int(sp.get("sampling_seed") or 0),
        )

    def _sglang_logprobs(
        self, meta: dict[str, Any], o: _Out, top: int, ids: list[int] | None, with_text: bool
    ) -> None:
        assert o.lp is not None
        lp = o.lp.tolist()

        def entry(pos: int, t: int) -> list[Any]:
            return [lp[pos][t], t, self.tok.decode([t]) if with_text else None]

        meta["output_token_logprobs"] = [entry(i, t) for i, t in enumerate(o.ids)]
        if top:
            best = o.lp.topk(min(top, o.lp.shape[-1]), dim=-1).indices.tolist() if o.ids else []
            meta["output_top_logprobs"] = [[entry(i, t) for t in row] for i, row in enumerate(best)]
        if ids is not None:
            meta["output_token_ids_logprobs"] = [
                [entry(i, t) for t in ids] for i in range(len(o.ids))
            ]

    # -- OpenAI /v1/completions -------------------------------------------------------------
    def openai_completions(self, req: dict[str, Any], fault: str) -> Any:
        unknown = set(req) - OPENAI_REQUEST
        if unknown:
            raise BadRequest(f"unrecognized request arguments {sorted(unknown)}")
        if req.get("model") != self.served_model:
            raise BadRequest(f"The model `{req.get('model')}` does not exist.", status=404)
        if req.get("stream") or req.get("echo") or req.get("n", 1) != 1:
            raise BadRequest("the loopback implements stream=false, echo=false, n=1 only")
        prompt = req.get("prompt")
        if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        ):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be a string, a list of strings, or token id lists")
        prompts = [
            self.tok(x, add_special_tokens=False)["input_ids"] if isinstance(x, str) else x
            for x in prompt
        ]
        k = req.get("logprobs")
        if k is not None and not (isinstance(k, int) and 0 <= k <= 20):
            raise BadRequest("logprobs must be an integer in [0, 20]")
        bias = req.get("logit_bias") or {}
        if self.faults.ignore_logit_bias:
            bias = {}
        max_tokens = int(req.get("max_tokens", 16))
        if bias and max_tokens != 1:
            raise BadRequest("the loopback implements logit_bias for max_tokens = 1 only")
        p = _Params(
            max_new_tokens=max_tokens,
            temperature=float(req.get("temperature", 1.0)),
            top_p=float(req.get("top_p", 1.0)),
            stop=_stops(req.get("stop")),
            seed=int(req.get("seed") or 0),
            logit_bias=tuple((int(t), float(b)) for t, b in bias.items()),
        )
        outs = self.complete(prompts, p, logprobs=k is not None)
        choices = []
        for i, o in enumerate(outs):
            c: dict[str, Any] = {
                "index": i,
                "text": o.text,
                "logprobs": self._openai_logprobs(o, k) if k is not None else None,
                "finish_reason": o.finish["type"],
            }
            if req.get("return_token_ids"):
                c["token_ids"], c["prompt_token_ids"] = o.ids, o.prompt
            choices.append(c)
        if fault == "short":
            choices = choices[:-1]
        n_in, n_out = sum(len(o.prompt) for o in outs), sum(len(o.ids) for o in outs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served_model,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_in,
                "completion_tokens": n_out,
                "total_tokens": n_in + n_out,
            },
        }

    def _openai_logprobs(self, o: _Out, k: int) -> dict[str, Any]:
        assert o.lp is not None
        names = [self.tok.decode([t]) for t in o.ids]
        offsets = [sum(len(x) for x in names[:i]) for i in range(len(names))]
        top = []
        for pos, t in enumerate(o.ids):
            row = o.lp[pos]
            best = row.topk(k).indices.tolist() if k else []
            # vLLM also lists the sampled token
            top.append({self.tok.decode([j]): float(row[j]) for j in [*best, t]})
        return {
            "tokens": names,
            "token_logprobs": [float(o.lp[i, t]) for i, t in enumerate(o.ids)],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.served_model, "object": "model", "owned_by": "loopback"}],
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _done(self) -> None:
        """Take this request out of the in-flight count, before its reply (or drop) goes out:
        a client that has its reply may send its next request at once, and that one must not
        find this one still counted."""
        if getattr(self, "_counted", False):
            self._counted = False
            self.server.loopback.end()

    def _send(self, status: int, body: bytes) -> None:
        self._done()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _drop(self) -> None:
        self._done()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        lb: LoopbackServer = self.server.loopback
        if self.path in ("/health", "/health_generate"):
            self._send(200, b"")
        elif self.path == "/v1/models":
            self._json(200, lb.models())
        elif self.path == "/get_model_info":
            self._json(200, {"model_path": lb.served_model, "is_generation": True})
        else:
            self._json(404, {"detail": "Not Found"})

    def _trickle(self, status: int, body: bytes) -> None:
        """The whole reply, status line and headers included, one byte at a time."""
        self._done()
        self.close_connection = True
        head = (
            f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        lb: LoopbackServer = self.server.loopback
        with contextlib.suppress(OSError):
            for i in range(len(head + body)):
                self.wfile.write((head + body)[i : i + 1])
                self.wfile.flush()
                if lb._stopping.wait(lb.faults.trickle_s):
                    return

    def _huge(self, stream: bool) -> None:
        """200 with a body of ``huge_bytes``: announced (the client may refuse by the header),
        or streamed without a length until the client hangs up."""
        self._done()
        self.close_connection = True
        n = self.server.loopback.faults.huge_bytes
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if stream:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"0" * (1 << 16)
        with contextlib.suppress(OSError):
            for _ in range(0, n if stream else 1 << 20, len(chunk)):
                self.wfile.write(chunk)

    def do_POST(self) -> None:
        lb: LoopbackServer = self.server.loopback
        lb.auth.append(self.headers.get("Authorization"))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        routes = {"/generate": lb.sglang_generate, "/v1/completions": lb.openai_completions}
        if self.path not in routes:
            self._json(404, {"detail": "Not Found"})
            return
        fault = lb.begin()
        self._counted = True
        try:
            if fault == "kill":
                self._drop()
                lb.kill()
                return
            if fault == "drop":
                self._drop()
                return
            if fault == "hang":
                lb._stopping.wait(lb.faults.hang_s)
                self._drop()
                return
            if fault in ("500", "503", "400"):
                self._json(int(fault), {"error": {"message": f"injected HTTP {fault}"}})
                return
            if fault == "garbage":
                self._send(200, b'{"text": "unterminated')
                return
            if fault in ("huge", "huge_stream"):
                self._huge(stream=fault == "huge_stream")
                return
            if fault == "slow":
                time.sleep(lb.faults.slow_s)
            try:
                status, obj = 200, routes[self.path](json.loads(body), fault)
            except BadRequest as e:
                status, obj = e.status, {"error": {"message": str(e), "code": e.status}}
            except (ValueError, TypeError, KeyError) as e:
                status, obj = 400, {"error": {"message": f"{type(e).__name__}: {e}"}}
            if lb.dead:  # killed while this request was in flight
                self._drop()
                return
            if status == 200 and lb.faults.tamper is not None:
                obj = lb.faults.tamper(self.path, obj)
            if fault == "trickle":
                self._trickle(status, json.dumps(obj).encode())
                return
            self._json(status, obj)
        finally:
            self._done()


def build_chatty(out: Path, *, seed: int = 0) -> Path:
    """The tiny tokenizer with a tiny Llama whose greedy output varies with the prompt and
    sometimes ends with EOS (tests/tiny.py's default init repeats one token forever)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny import build_tokenizer, tiny_config

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(out))
    config = tiny_config(vocab, tie=False, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # EOS logit = 3 * h[0]: a stop now and then
        model.lm_head.weight[2] = 0
        model.lm_head.weight[2, 0] = 3.0
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.loopback")
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--served-model", default="loopback-model")
    ap.add_argument("--exit-after", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    server = LoopbackServer(
        args.model,
        port=args.port,
        served_model=args.served_model,
        faults=Faults(exit_after=args.exit_after),
    )
    print(f"loopback serving {args.model} at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
