"""Local transformers backend: batched, length-sorted generation (the CPU default)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ssrengine.generation.base import Completion, Generator, Request, SamplingParams
from ssrengine.models import load_model, load_tokenizer


class HFGenerator(Generator):
    backend = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        trust_remote_code: bool = False,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.model_name = model_path
        self.model = model_path
        self.tokenizer = tokenizer or load_tokenizer(
            model_path, trust_remote_code=trust_remote_code
        )
        self.lm = model or load_model(
            model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.lm.eval()
        self.batch_size = batch_size
        self.device = next(self.lm.parameters()).device
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.lm.generation_config, "eos_token_id", None)
        eos |= set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )
        self.eos_ids = sorted(i for i in eos if i is not None)
        # Prefill computes only the last position's logits where the model supports it.
        forward_args = inspect.signature(self.lm.forward).parameters
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        from ssrengine.data import encode_prompt

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

    @staticmethod
    def _sample(
        logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator
    ) -> torch.Tensor:
        """Temperature then top-p (nucleus) sampling, as transformers' warpers apply them."""
        scores = logits.float() / sampling.temperature
        if sampling.top_p < 1.0:
            sorted_scores, sorted_idx = scores.sort(dim=-1)  # ascending
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum <= 1 - sampling.top_p
            drop[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> list[Completion]:
        """Prefill the left-padded batch once, then decode one token per live row per step;
        rows that finish (EOS or max_new_tokens) leave the batch and the KV cache, so later
        steps compute only the rows still generating."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        width = max(len(p) for p in prompts)
        dev = self.device
        # Left padding so every row's next token is at the same position.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = pos[:, -1] + 1
        greedy = sampling.temperature <= 0
        gen = None if greedy else torch.Generator(device=dev).manual_seed(sampling.seed)
        wanted = (
            torch.tensor(sampling.logprob_token_ids, device=dev)
            if sampling.logprob_token_ids
            else None
        )
        eos = set(self.eos_ids)
        n = len(prompts)
        toks: list[list[int]] = [[] for _ in range(n)]
        step_lps: list[list[list[float]]] = [[] for _ in range(n)]
        finish = ["length"] * n
        live = list(range(n))  # batch row -> original row
        cache = DynamicCache(config=self.lm.config)
        logits = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **self._last_logits,
        ).logits[:, -1]
        for step in range(sampling.max_new_tokens):
            nxt = logits.argmax(-1) if greedy else self._sample(logits, sampling, gen)
            if wanted is not None:
                lp = torch.log_softmax(logits.float(), dim=-1)[:, wanted].tolist()
                for j, b in enumerate(live):
                    step_lps[b].append(lp[j])
            keep = []
            last = step + 1 == sampling.max_new_tokens
            for j, (b, t) in enumerate(zip(live, nxt.tolist())):
                if t in eos:
                    finish[b] = "stop"
                else:
                    toks[b].append(t)
                    if not last:
                        keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep, device=dev)
                live = [live[j] for j in keep]
                nxt, mask, next_pos = nxt[sel], mask[sel], next_pos[sel]
                cache.batch_select_indices(sel)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = self.lm(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        out = []
        for b, row in enumerate(toks):
            fin = finish[b]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for s in sampling.stop:
                if s in text:
                    text, fin = text[: text.index(s)], "stop"
            lps = []
            if wanted is not None:
                # As before: the EOS step's logprobs only when it is the only step.
                k = max(1, len(row)) if fin == "stop" else len(row)
                lps = [dict(zip(sampling.logprob_token_ids, v)) for v in step_lps[b][:k]]
            out.append(
                Completion(
                    text=text.strip(),
                    token_ids=row,
                    finish_reason=fin,
                    logprobs=lps,
                    prompt_tokens=len(prompts[b]),
                )
            )
        return out

    def close(self) -> None:
        self.lm = None
