"""The loss of one optimizer step: `loss_sum` (the one place the loss is computed),
`CausalLMLoss` (model + loss as the unit FSDP2 and DDP wrap) and `accumulate` (backward over a
rank's micro-batches, normalized by the whole step's supervised tokens).

Loss normalization (torchtitan/torchtune): count the supervised tokens of the whole optimizer
step first — all micro-batches, all ranks (one all-reduce) — sum-reduce each micro-batch's loss
and divide by that count; never average micro-batch means (the 2024 gradient-accumulation bug).
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextlib import nullcontext
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn

from ssrengine.data.records import IGNORE_INDEX
from ssrengine.models.loading import head_bias_and_softcap, hidden_and_head
from ssrengine.training import distributed
from ssrengine.training.batching import MicroBatch


def loss_sum(
    model: Any,
    mb: MicroBatch,
    impl: str = "auto",
    grad_filter: bool = False,
    unlikelihood: float = 0.0,
) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of one micro-batch, each token times its
    `MicroBatch.token_weights` where the batch has them (`ssrengine.training.loss_weights`),
    plus ``unlikelihood`` × `unlikelihood_sum` where the batch has unlikelihood targets.

    The one place the loss is computed: ``impl`` selects the fused kernel (never builds the
    [tokens, vocab] logits) or ``naive`` (full logits + F.cross_entropy, the reference);
    ``grad_filter``: the fused kernel's gradient filtering (train.loss_grad_filter)."""
    hidden, weight = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    # Phi's lm_head bias, Gemma-2's final softcap: the rest of the model's logits
    head = head_bias_and_softcap(model)
    loss = _cross_entropy_sum(hidden, weight, mb, impl, grad_filter, head)
    if unlikelihood and mb.unlikely_positions is not None:
        loss = loss + unlikelihood * unlikelihood_sum(
            hidden, weight, mb.unlikely_positions, mb.unlikely_tokens
        )
    return loss


def unlikelihood_sum(
    hidden: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Σ −log(1 − p(token | position)) (Welleck et al. 2019, "Neural text generation with
    unlikelihood training"): pushes probability away from the refusal's token after an
    answerable prompt whose own answer was accepted. Only the K penalized positions get logits,
    (K, V): never the whole row's."""
    logits = (hidden[positions] @ weight.T).float()  # (K, V)
    logp = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)  # (K,)
    # log(1 - p) = log(-expm1(log p)); clamped below 0 so p → 1 stays finite
    return -torch.log(-torch.expm1(logp.clamp(max=-1e-6))).sum()


def _cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mb: MicroBatch,
    impl: str,
    grad_filter: bool,
    head: tuple[torch.Tensor | None, float | None] = (None, None),  # (bias, softcap)
) -> torch.Tensor:
    labels = mb.labels.reshape(-1)  # (N,)
    tw = None if mb.token_weights is None else mb.token_weights.reshape(-1)
    bias, softcap = head
    if impl == "naive":
        logits = F.linear(hidden, weight, bias).float()  # (N, V)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if tw is None:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return (ce * tw).sum()
    from ssrengine.kernels import fused_linear_cross_entropy

    # Labels come from our own tokenization; the range check costs a host sync, so it runs
    # only where syncs are free (CPU).
    return fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, token_weights=tw, ignore_index=IGNORE_INDEX,
        reduction="sum", softcap=softcap, impl=impl, validate=hidden.device.type == "cpu",
        grad_filter=grad_filter,
        grad_into_weight=True,  # the trainer only ever calls .backward() on it
    )  # fmt: skip


class CausalLMLoss(nn.Module):
    """A transformers model and `loss_sum` as one module: the unit FSDP2 and DDP wrap.

    Both act in the root module's forward — FSDP2 unshards the root's parameters (embeddings,
    lm_head) for it, DDP arms its gradient all-reduce — so the loss must run inside it; there
    `hidden_and_head` returns the full [V, H] lm_head weight, never a DTensor shard."""

    def __init__(
        self,
        model: Any,
        impl: str = "auto",
        grad_filter: bool = False,
        memory_budget: float | None = None,
        unlikelihood: float = 0.0,
    ) -> None:
        super().__init__()
        self.model, self.impl, self.grad_filter = model, impl, grad_filter
        self.memory_budget = memory_budget  # train.compile_memory_budget; None: not compiled
        self.unlikelihood = unlikelihood  # train.unlikelihood_weight

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        # Compiled layers are partitioned on their first forward, under this budget.
        budget = (
            contextlib.nullcontext()
            if self.memory_budget is None
            else functorch_config.patch(activation_memory_budget=self.memory_budget)
        )
        with budget:
            return loss_sum(self.model, mb, self.impl, self.grad_filter, self.unlikelihood)


def accumulate(
    model: Any,
    mbs: list[MicroBatch],
    *,
    impl: str = "auto",
    autocast: Any = None,
    world_size: int = 1,
    scaler: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this rank's micro-batches of one optimizer step.

    ``model``: a transformers model, or a `CausalLMLoss` (wrapped by FSDP2/DDP or not). Returns
    (summed loss, normalizer) of the whole step over all ranks, as 0-d tensors: the normalizer is
    the supervised-token count, or with loss weights their sum. FSDP2 and DDP average gradients
    over ranks, hence the factor ``world_size`` in the normalizer. ``scaler``: a GradScaler
    whose scale multiplies the loss before backward (fp16)."""
    if not isinstance(distributed.unwrap(model), CausalLMLoss):
        model = CausalLMLoss(model, impl)
    device = next(model.parameters()).device
    n_sup = distributed.all_sum(
        torch.tensor(float(sum(mb.normalizer for mb in mbs)), device=device)
    )
    # weights may sum below 1; an empty step has a zero loss whatever the divisor
    norm = n_sup.float().clamp(min=1e-12) / world_size
    total = torch.zeros((), device=device)
    for i, mb in enumerate(mbs):
        # Gradients cross ranks once per step, in the last micro-batch's backward.
        with distributed.grad_sync(model, i == len(mbs) - 1):
            with autocast or nullcontext():
                loss = model(to_device(mb, device))
            step_loss = loss / norm
            # fp16 (train.dtype = float16): backward through the loss times the loss scale
            (step_loss if scaler is None else scaler.scale(step_loss)).backward()
        total += loss.detach()
    return distributed.all_sum(total), n_sup


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.model_kwargs.items()}

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(
        mb,
        input_ids=mb.input_ids.to(device),
        labels=mb.labels.to(device),
        model_kwargs=kw,
        token_weights=to(mb.token_weights),
        unlikely_positions=to(mb.unlikely_positions),
        unlikely_tokens=to(mb.unlikely_tokens),
    )
