"""SGLang server backend through its native ``POST /generate`` (token ids in, token ids out).

Request (one per batch of ``batch_size`` prompts; SGLang's GenerateReqInput):
    {"input_ids": [[...], ...],
     "sampling_params": {"max_new_tokens", "temperature", "top_p", "stop"?},
     "return_logprob": true, "token_ids_logprob": [[yes, no], ...]}   # only when asked
Reply: a list, one per prompt, of
    {"text", "output_ids",
     "meta_info": {"finish_reason": {"type": "stop"|"length"|"abort", "matched"?: id|str},
                   "prompt_tokens", "completion_tokens",
                   "output_token_ids_logprobs": [[[logprob, token_id, text|null], ...], ...]}}
``output_ids`` is the detokenizer's ``decode_ids``: it begins up to 5 tokens before the end of
the prompt (INIT_INCREMENTAL_DETOKENIZATION_OFFSET in python/sglang/srt/managers/
schedule_batch.py; sgl-project/sglang#17240, closed without a fix), so the generated ids are its
last ``meta_info["completion_tokens"]``. It also keeps the stop token that ended generation
(SGLang trims it from the text only); that is dropped here so token ids match the hf backend. The server is one started by the
user (``python -m sglang.launch_server``) or by us with ``generation.launch = true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.core.errors import InputError
from ssrengine.generation.base import Completion, Generator, Request, SamplingParams, model_name
from ssrengine.generation.http import (
    BACKOFF_S,
    HTTPClient,
    MalformedReply,
    PromptEncoder,
    check_logprob,
    check_token_ids,
)


def sglang_sampling(s: SamplingParams) -> dict[str, Any]:
    """SGLang ``sampling_params`` (temperature 0 = greedy)."""
    out: dict[str, Any] = {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    if s.stop:
        out["stop"] = list(s.stop)
    return out


def sglang_logprob_args(s: SamplingParams, n: int) -> dict[str, Any]:
    if not s.logprob_token_ids:
        return {}
    return {"return_logprob": True, "token_ids_logprob": [list(s.logprob_token_ids)] * n}


def parse_sglang_outputs(
    obj: Any, n: int, s: SamplingParams, vocab_size: int | None = None
) -> list[Completion]:
    """A batched /generate reply (or Engine.generate result) → one Completion per prompt.
    ``vocab_size``: check every id against it (a server's reply; the in-process engine's
    results are not checked)."""
    if not isinstance(obj, list) or len(obj) != n:
        got = f"a list of {len(obj)}" if isinstance(obj, list) else type(obj).__name__
        raise MalformedReply(f"expected a list of {n} results, got {got}")
    return [_parse_one(o, s, vocab_size, f"[{i}]") for i, o in enumerate(obj)]


def _parse_one(o: dict[str, Any], s: SamplingParams, vocab_size: int | None, at: str) -> Completion:
    meta = o["meta_info"]
    reason = meta["finish_reason"]
    kind = reason["type"]
    if kind == "abort":
        raise MalformedReply(f"request aborted by the server: {reason.get('message')}")
    if kind not in ("stop", "length"):
        raise MalformedReply(f"unknown finish_reason {reason!r}")
    text, ids = o["text"], [int(t) for t in o["output_ids"]]
    if not isinstance(text, str):
        raise MalformedReply("'text' is not a string")
    generated = int(meta["completion_tokens"])
    if not 0 <= generated <= len(ids):
        raise MalformedReply(f"completion_tokens {generated} for {len(ids)} output_ids")
    ids = ids[len(ids) - generated :]  # drop the prompt tail the detokenizer prepends
    if vocab_size is not None:  # the ids asked for, plus the stop token that ended them
        field = f"{at}.output_ids"
        check_token_ids(ids, vocab_size=vocab_size, limit=s.max_new_tokens + 1, field=field)
    matched = reason.get("matched")
    if kind == "stop" and isinstance(matched, int) and ids and ids[-1] == matched:
        ids = ids[:-1]  # the EOS/stop token, as the hf backend leaves it out
    logprobs = []
    if s.logprob_token_ids:
        steps = meta["output_token_ids_logprobs"]
        # One position per kept token (at least the first), as the hf backend returns them.
        need = max(1, len(ids)) if s.max_new_tokens > 0 else 0
        if len(steps) < need:
            raise MalformedReply(f"{len(steps)} logprob positions for {len(ids)} tokens")
        for i, step in enumerate(steps[:need]):
            field = f"{at}.meta_info.output_token_ids_logprobs[{i}]"
            got = {int(t): check_logprob(lp, field=field) for lp, t, *_ in step}
            missing = [t for t in s.logprob_token_ids if t not in got]
            if missing:
                raise MalformedReply(f"token_ids_logprob misses ids {missing}")
            logprobs.append({t: got[t] for t in s.logprob_token_ids})
    return Completion(
        text=text.strip(),
        token_ids=ids,
        finish_reason=kind,
        logprobs=logprobs,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
    )


class SGLangHTTPGenerator(Generator):
    backend = "sglang-http"

    def __init__(
        self,
        model: ModelConfig,
        gen: GenerationConfig,
        *,
        tokenizer: Any = None,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.model = model_name(model, gen)
        self.batch_size = max(1, gen.batch_size)
        trust = model.trust_remote_code
        self.enc = PromptEncoder.for_model(self.model, model, tokenizer)
        self.tokenizer = self.enc.tokenizer
        self.server = None
        url = gen.url
        if gen.launch:
            if url:
                raise InputError(
                    "set generation.url (a running server) or generation.launch = true, not both",
                    field="generation.launch",
                )
            from ssrengine.generation.launch import launch_sglang

            self.server = launch_sglang(
                self.model,
                tp_size=gen.tp_size,
                dp_size=gen.dp_size,
                mem_fraction=gen.mem_fraction,
                dtype=model.dtype,
                trust_remote_code=trust,
                python=gen.launch_python,
            )
            url = self.server.url
        if not url:
            raise InputError(
                "sglang-http needs the server URL (or generation.launch = true)",
                field="generation.url",
            )
        self.client = HTTPClient(
            url,
            timeout_s=gen.timeout_s,
            max_retries=gen.max_retries,
            concurrency=gen.concurrency,
            deadline_s=gen.deadline_s,
            max_reply_bytes=gen.max_reply_bytes,
            backoff_s=backoff_s,
        )
        self.url = self.client.name

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return self.enc.tokenize(messages)

    def token_id(self, text: str) -> int:
        return self.enc.token_id(text)

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        prompts = self.enc.prompt_ids(requests)
        bs = self.batch_size
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]

        def post(batch: list[list[int]]) -> list[Completion]:
            payload = {
                "input_ids": batch,
                "sampling_params": sglang_sampling(sampling),
                **sglang_logprob_args(sampling, len(batch)),
            }
            return self.client.request(
                "POST",
                "/generate",
                payload,
                parse=lambda obj: parse_sglang_outputs(
                    obj, len(batch), sampling, self.enc.vocab_size
                ),
            )

        return [c for part in self.client.map(post, batches) for c in part]

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
