"""Local transformers backend: batched, length-sorted generation (the CPU default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        from ssrengine.data import encode_prompt

        return encode_prompt(self.tokenizer, messages)

    def token_id(self, text: str) -> int:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]

    def _ids(self, r: Request) -> list[int]:
        return r.input_ids if r.input_ids is not None else self.tokenize(r.messages or [])

    @torch.no_grad()
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
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        # Left padding so every row's next token is at the same position.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        greedy = sampling.temperature <= 0
        if not greedy:
            torch.manual_seed(sampling.seed)
        res = self.lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=sampling.temperature if not greedy else None,
            top_p=sampling.top_p if not greedy else None,
            top_k=None,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=bool(sampling.logprob_token_ids),
        )
        new = res.sequences[:, width:].tolist()
        step_logprobs = None
        if sampling.logprob_token_ids:
            wanted = torch.tensor(sampling.logprob_token_ids, device=self.device)
            # (steps, B, len(wanted)) from the raw logits of every generated step
            step_logprobs = torch.stack(
                [torch.log_softmax(s.float(), dim=-1)[:, wanted] for s in res.logits]
            ).tolist()
        out = []
        for b, toks in enumerate(new):
            finish = "length"
            for j, t in enumerate(toks):
                if t in self.eos_ids:
                    toks, finish = toks[:j], "stop"
                    break
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in sampling.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            lps = []
            if step_logprobs is not None:
                n = max(1, len(toks)) if finish == "stop" else len(toks)
                lps = [dict(zip(sampling.logprob_token_ids, step[b])) for step in step_logprobs[:n]]
            out.append(
                Completion(
                    text=text.strip(),
                    token_ids=toks,
                    finish_reason=finish,
                    logprobs=lps,
                    prompt_tokens=len(prompts[b]),
                )
            )
        return out

    def close(self) -> None:
        self.lm = None
