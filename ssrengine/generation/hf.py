"""Local transformers backend: batched, length-sorted generation (the CPU default).

A batch is decoded in the gpt-fast shape: `_prefill` the left-padded prompts once, then
`_decode_one` token per step for the rows still generating, and `_finish` each row into a
`Completion`. A row that ends (EOS or max_new_tokens) leaves the batch and the KV cache, so
later steps compute only the rows still generating.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ssrengine.core.config import GenerationConfig, ModelConfig
from ssrengine.data.records import encode_prompt
from ssrengine.generation.base import (
    Completion,
    Generator,
    Request,
    SamplingParams,
    eos_ids,
    model_name,
)
from ssrengine.models import precision
from ssrengine.models.loading import load_model, load_tokenizer


@dataclass
class _Rows:
    """One batch being decoded: the rows still generating and what every row produced."""

    live: list[int]  # batch row -> prompt index, for the rows still generating
    mask: torch.Tensor  # (live, T) attention mask over prompt + generated tokens
    next_pos: torch.Tensor  # (live,) position of each live row's next token
    cache: DynamicCache
    tokens: list[list[int]]  # per prompt: generated ids, EOS excluded
    logprobs: list[list[list[float]]]  # per prompt, per step: logprobs of the wanted ids
    finish: list[str]  # per prompt: "length" until an EOS makes it "stop"


class HFGenerator(Generator):
    backend = "hf"

    def __init__(
        self,
        model: ModelConfig,
        gen: GenerationConfig | None = None,
        *,
        hf_model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """Generate with ``gen.model`` (empty: ``model.path``) as ``model`` says to load it;
        ``hf_model`` / ``tokenizer`` reuse ones already loaded."""
        gen = gen or GenerationConfig()
        self.model = model_name(model, gen)  # the name recorded in every row
        trust = model.trust_remote_code
        self.tokenizer = tokenizer or load_tokenizer(
            self.model, trust_remote_code=trust, chat_template=model.chat_template
        )
        self.hf_model = hf_model or load_model(
            self.model, dtype=model.dtype, device=model.device, trust_remote_code=trust
        )
        self.hf_model.eval()
        self.batch_size = gen.batch_size
        self.device = next(self.hf_model.parameters()).device
        # bf16 autocast over fp32 weights on a GPU with bf16, as training's train.dtype auto:
        # fp32 would run every matmul on CUDA cores.
        self._compute = precision.model_inference_dtype(self.hf_model)
        self.eos_ids = eos_ids(self.tokenizer, self.hf_model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        forward_args = inspect.signature(self.hf_model.forward).parameters
        # Prefill computes only the last position's logits where the model supports it.
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
        # transformers 5.x renamed forward's `past_key_values` to `cache` and warns on the old
        # name (models/llama/modeling_llama.py: @deprecate_kwarg("past_key_values", "5.40.0",
        # new_name="cache")); 4.x and remote code know only the old one.
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def token_id(self, text: str) -> int:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]

    def _ids(self, r: Request) -> list[int]:
        return r.input_ids if r.input_ids is not None else self.tokenize(r.messages or [])

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        prompts = [self._ids(r) for r in requests]
        # Longest first: similar lengths share a batch (little padding), and an OOM shows at once.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, c in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling)):
                out[i] = c
        return [c for c in out if c is not None]

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """Prefill, then one token per step for the live rows until all have ended."""
        ids = sampling.logprob_token_ids
        wanted = torch.tensor(ids, device=self.device) if ids else None
        pick = self._picker(sampling, prompts)
        rows, logits = self._prefill(prompts)
        for step in range(sampling.max_new_tokens):
            nxt = pick(logits, rows.live)
            if wanted is not None:
                self._record_logprobs(rows, logits, wanted)
            keep = self._append(rows, nxt, last=step + 1 == sampling.max_new_tokens)
            if not keep:
                break
            logits = self._decode_one(rows, nxt, keep)
        return [self._finish(p, rows, b, sampling) for b, p in enumerate(prompts)]

    def _forward(
        self, ids: torch.Tensor, rows: _Rows, pos: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        """Logits of the last position of each row, the KV cache extended in place."""
        with precision.autocast_for(self.device, self._compute):
            out = self.hf_model(
                input_ids=ids,
                attention_mask=rows.mask,
                position_ids=pos,
                use_cache=True,
                **{self._cache_arg: rows.cache},
                **kw,
            )
        return out.logits[:, -1]

    def _prefill(self, prompts: list[list[int]]) -> tuple[_Rows, torch.Tensor]:
        """The whole left-padded batch in one forward: every row's next token is at one position."""
        width, dev, n = max(len(p) for p in prompts), self.device, len(prompts)
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = _Rows(
            live=list(range(n)),
            mask=mask,
            next_pos=pos[:, -1] + 1,
            cache=DynamicCache(config=self.hf_model.config),
            tokens=[[] for _ in range(n)],
            logprobs=[[] for _ in range(n)],
            finish=["length"] * n,
        )
        return rows, self._forward(ids, rows, pos, **self._last_logits)

    def _picker(
        self, sampling: SamplingParams, prompts: list[list[int]]
    ) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        """(logits (live, V), live rows) -> next ids (live,): argmax, or temperature/top-p
        sampling with one generator per prompt, seeded from ``sampling.seed`` and the prompt:
        a prompt's answer depends on the seed alone, not on which prompts share its batch, so
        a stage resumed with other batches, or sample i of generation.num_samples (seed + i),
        repeats exactly."""
        if sampling.temperature <= 0:
            return lambda logits, live: logits.argmax(-1)
        gens = [
            torch.Generator(device=self.device).manual_seed(_row_seed(sampling.seed, p))
            for p in prompts
        ]
        return lambda logits, live: _sample(logits, sampling, [gens[b] for b in live])

    @staticmethod
    def _record_logprobs(rows: _Rows, logits: torch.Tensor, wanted: torch.Tensor) -> None:
        lp = torch.log_softmax(logits.float(), dim=-1)[:, wanted].tolist()
        for j, b in enumerate(rows.live):
            rows.logprobs[b].append(lp[j])

    def _append(self, rows: _Rows, nxt: torch.Tensor, *, last: bool) -> list[int]:
        """Add each live row's new token (an EOS ends the row instead); the batch rows that go
        on to another step."""
        eos, keep = set(self.eos_ids), []
        for j, (b, t) in enumerate(zip(rows.live, nxt.tolist())):
            if t in eos:
                rows.finish[b] = "stop"
            else:
                rows.tokens[b].append(t)
                if not last:
                    keep.append(j)
        return keep

    def _decode_one(self, rows: _Rows, nxt: torch.Tensor, keep: list[int]) -> torch.Tensor:
        """Evict the rows that ended (from the batch and the KV cache), then feed the others'
        new token; returns their next logits."""
        if len(keep) < len(rows.live):
            sel = torch.tensor(keep, device=self.device)
            rows.live = [rows.live[j] for j in keep]
            nxt, rows.mask, rows.next_pos = nxt[sel], rows.mask[sel], rows.next_pos[sel]
            rows.cache.batch_select_indices(sel)
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.live), 1)], dim=1)
        logits = self._forward(nxt[:, None], rows, rows.next_pos[:, None])
        rows.next_pos = rows.next_pos + 1
        return logits

    def _finish(
        self, prompt: list[int], rows: _Rows, b: int, sampling: SamplingParams
    ) -> Completion:
        """Prompt ``b``'s Completion: text cut at the first stop string, logprobs per token."""
        tokens, finish = rows.tokens[b], rows.finish[b]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in sampling.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        # One logprob step per kept token; a row that ended has one step more (the EOS step),
        # which is kept only when it is the only one: a one-step read such as the judge's.
        k = max(1, len(tokens)) if finish == "stop" else len(tokens)
        ids = sampling.logprob_token_ids
        return Completion(
            text=text.strip(),
            token_ids=tokens,
            finish_reason=finish,
            logprobs=[dict(zip(ids, v)) for v in rows.logprobs[b][:k]] if ids else [],
            prompt_tokens=len(prompt),
        )

    def close(self) -> None:
        self.hf_model = None


def _row_seed(seed: int, prompt: list[int]) -> int:
    """A 63-bit seed from the sampling seed and the prompt's token ids."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _sample(
    logits: torch.Tensor, sampling: SamplingParams, gens: list[torch.Generator]
) -> torch.Tensor:
    """Temperature then top-p (nucleus) sampling, as transformers' warpers apply them; row j
    draws from ``gens[j]``."""
    scores = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_scores, sorted_idx = scores.sort(dim=-1)  # ascending
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - sampling.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)])
