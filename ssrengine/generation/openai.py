"""Any OpenAI-compatible ``POST /v1/completions`` endpoint (vLLM, SGLang, ...).

Request (one per batch of ``batch_size`` prompts; prompts are sent as token ids, which the
completions API accepts as "an array of token arrays"):
    {"model", "prompt": [[...], ...], "max_tokens", "temperature", "top_p", "n": 1, "stop"?,
     "seed"?, "logprobs": k?, "logit_bias"?, "return_token_ids": true}
Reply: {"choices": [{"index", "text", "finish_reason": "stop"|"length",
                     "logprobs": {"tokens", "token_logprobs", "top_logprobs": [{token: lp}]},
                     "token_ids"?}], "usage": {...}}

The API cannot return the logprob of an arbitrary token id, so for
``SamplingParams.logprob_token_ids`` we ask for the top-``k`` logprobs and look the ids up by
their token strings; where one is absent, ``Completion.logprobs`` stays empty and the LLM
judge falls back to constrained choice on the text. For one-step scoring (the judge) we also
send ``logit_bias`` = +100 on the wanted ids: the sampled token is then one of them (a
constrained choice) and, where the server reports logprobs after the bias (OpenAI's
semantics), they are in the top-k. An equal bias on every wanted id leaves their differences,
hence P(Yes)/(P(Yes)+P(No)), unchanged.

``return_token_ids`` is vLLM's extension (>= 0.10.2) for the exact generated ids; servers
that ignore it get their text re-tokenized here.
"""

from __future__ import annotations

import os
import threading
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
from ssrengine.generation.http import (
    BACKOFF_S,
    HTTPClient,
    MalformedReply,
    PromptEncoder,
    check_logprob,
    check_token_ids,
)

TOP_LOGPROBS = 5  # the largest `logprobs` OpenAI's own API accepts; vLLM and SGLang take it too
BIAS = 100.0  # the top of OpenAI's logit_bias range


class OpenAIGenerator(Generator):
    backend = "openai"

    def __init__(
        self,
        model: ModelConfig,
        gen: GenerationConfig,
        *,
        served_model: str = "",
        api_key: str | None = None,
        tokenizer: Any = None,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        """``served_model``: the name the server knows the model by (empty: ask the server);
        ``api_key`` (default: $OPENAI_API_KEY) is sent as a bearer token."""
        self.model = model_name(model, gen)
        self.batch_size = max(1, gen.batch_size)
        self.enc = PromptEncoder.for_model(self.model, model, tokenizer)
        self.tokenizer = self.enc.tokenizer
        if not gen.url:
            raise InputError("openai needs the server URL", field="generation.url")
        # Accept both http://host:port and http://host:port/v1.
        bases = [u.strip().rstrip("/").removesuffix("/v1") for u in gen.url.split(",") if u.strip()]
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.client = HTTPClient(
            bases,
            timeout_s=gen.timeout_s,
            max_retries=gen.max_retries,
            concurrency=gen.concurrency,
            deadline_s=gen.deadline_s,
            max_reply_bytes=gen.max_reply_bytes,
            backoff_s=backoff_s,
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        self.url = self.client.name
        self._served = served_model
        self._served_lock = threading.Lock()
        self._keys: dict[int, tuple[str, ...]] = {}

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return self.enc.tokenize(messages)

    def token_id(self, text: str) -> int:
        return self.enc.token_id(text)

    def served_model(self) -> str:
        """The name to put in ``model``: the server's only model, or ``model`` if it is listed."""
        with self._served_lock:
            if not self._served:
                ids = self.client.request(
                    "GET", "/v1/models", parse=lambda o: [str(m["id"]) for m in o["data"]]
                )
                if len(ids) == 1 or self.model in ids:
                    self._served = ids[0] if len(ids) == 1 else self.model
                else:
                    raise BackendError(
                        f"the server lists models {ids}; none is {self.model!r}",
                        server=self.client.name,
                    )
            return self._served

    def _token_keys(self, t: int) -> tuple[str, ...]:
        """The strings a server may use for token ``t`` in ``top_logprobs``."""
        if t not in self._keys:
            self._keys[t] = (f"token_id:{t}", *self.enc.token_strings(t))
        return self._keys[t]

    def _payload(self, batch: list[list[int]], s: SamplingParams) -> dict[str, Any]:
        p: dict[str, Any] = {
            "model": self.served_model(),
            "prompt": batch,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "n": 1,
            "return_token_ids": True,
        }
        if s.stop:
            p["stop"] = list(s.stop)
        if s.temperature > 0:
            p["seed"] = s.seed
        if s.logprob_token_ids:
            p["logprobs"] = TOP_LOGPROBS
            if s.max_new_tokens == 1:
                p["logit_bias"] = {str(t): BIAS for t in s.logprob_token_ids}
        return p

    def _parse(self, obj: Any, batch: list[list[int]], s: SamplingParams) -> list[Completion]:
        choices = sorted(obj["choices"], key=lambda c: int(c["index"]))
        if len(choices) != len(batch):
            raise MalformedReply(f"expected {len(batch)} choices, got {len(choices)}")
        return [
            self._completion(c, prompt, s, f"choices[{i}]")
            for i, (c, prompt) in enumerate(zip(choices, batch))
        ]

    def _completion(
        self, c: dict[str, Any], prompt: list[int], s: SamplingParams, at: str
    ) -> Completion:
        text, finish = c["text"], c["finish_reason"]
        if not isinstance(text, str) or finish not in ("stop", "length"):
            raise MalformedReply(f"bad choice: text {type(text).__name__}, finish {finish!r}")
        ids = c.get("token_ids")
        if isinstance(ids, list):
            ids = [int(t) for t in ids]
            # the ids asked for, plus the stop token that ended them
            limit, field = s.max_new_tokens + 1, f"{at}.token_ids"
        else:
            ids = self.enc.encode(text)
            # re-tokenized text need not split as the server's tokens did: a looser bound
            limit, field = 2 * s.max_new_tokens + 8, f"{at}.text"
        check_token_ids(ids, vocab_size=self.enc.vocab_size, limit=limit, field=field)
        if finish == "stop" and ids and ids[-1] in self.enc.eos_ids:
            ids = ids[:-1]
        return Completion(
            text=text.strip(),
            token_ids=ids,
            finish_reason=finish,
            logprobs=self._logprobs(c.get("logprobs"), len(ids), s, f"{at}.logprobs"),
            prompt_tokens=len(prompt),
        )

    def _logprobs(self, lp: Any, n_ids: int, s: SamplingParams, at: str) -> list[dict[int, float]]:
        if not s.logprob_token_ids:
            return []
        if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
            raise MalformedReply("logprobs were asked for but the reply has none")
        out = []
        for i, top in enumerate(lp["top_logprobs"][: max(1, n_ids)]):
            step = {}
            for t in s.logprob_token_ids:
                key = next((k for k in self._token_keys(t) if top and k in top), None)
                if key is None:
                    return []  # not in the top-k: the judge falls back to constrained choice
                step[t] = check_logprob(top[key], field=f"{at}.top_logprobs[{i}][{key!r}]")
            out.append(step)
        return out

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        prompts = self.enc.prompt_ids(requests)
        bs = self.batch_size
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
        self.served_model()  # once, before the batches fan out

        def post(batch: list[list[int]]) -> list[Completion]:
            return self.client.request(
                "POST",
                "/v1/completions",
                self._payload(batch, sampling),
                parse=lambda obj: self._parse(obj, batch, sampling),
            )

        return [c for part in self.client.map(post, batches) for c in part]

    def close(self) -> None:
        self.client.close()
