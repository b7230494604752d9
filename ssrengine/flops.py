"""FLOPs of one training step: the numerator of "% of the FLOP ceiling" (CPU) and MFU (GPU).

Counted as in the PaLM/Chinchilla convention, forward + backward = 3 × forward, 2 FLOPs per
multiply-add:

- every token: 6 × the non-embedding parameters (the decoder's linear layers; norms are noise);
- the lm_head, 6 × V × H, only for supervised tokens: the fused cross-entropy
  (`ssrengine.kernels`) computes logits for supervised rows only, so prompt tokens skip it;
- causal attention, per layer and example of length L: QKᵀ and AV over the causal prefix,
  2 matmuls × 2 FLOPs × d_attn × L(L+1)/2 forward, × 3 for training. Packed rows attend only
  within their example, so the sum runs over examples, not over rows.

The embedding lookup is a gather (no FLOPs); a tied lm_head is counted once, as the head.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssrengine.batching import MicroBatch


@dataclass(frozen=True)
class FlopShape:
    """The sizes the FLOP count needs, read from a transformers causal LM."""

    dense_params: int  # non-embedding parameters: decoder layers + final norm
    head_params: int  # lm_head: vocab × hidden
    attn_dim: int  # heads × head_dim (the width of QKᵀ and AV)
    layers: int


def flop_shape(model: Any) -> FlopShape:
    """`FlopShape` of a transformers causal LM (the plain model, not a wrapper)."""
    c = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied weight once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    tied = head is emb
    dense = total - emb.numel() - (0 if tied else head.numel())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return FlopShape(
        dense_params=dense,
        head_params=head.numel(),
        attn_dim=c.num_attention_heads * head_dim,
        layers=c.num_hidden_layers,
    )


def training_flops(shape: FlopShape, lengths: Sequence[int], supervised_tokens: int) -> float:
    """FLOPs of forward + backward over examples of ``lengths`` tokens (attention never crosses
    examples) with ``supervised_tokens`` of them reaching the lm_head."""
    tokens = sum(lengths)
    attn = 3 * 4 * shape.attn_dim * shape.layers * sum(n * (n + 1) // 2 for n in lengths)
    return 6.0 * shape.dense_params * tokens + 6.0 * shape.head_params * supervised_tokens + attn


def example_lengths(mb: MicroBatch) -> list[int]:
    """Lengths of the examples in a micro-batch: packed rows from their cu_seqlens (or from
    position_ids restarting at 0), padded rows from the attention mask."""
    kw = mb.model_kwargs
    if "cu_seq_lens_q" in kw:
        return torch.diff(kw["cu_seq_lens_q"].cpu()).tolist()
    if "position_ids" in kw and "attention_mask" not in kw:
        pos = kw["position_ids"].reshape(-1).cpu()
        starts = (pos == 0).nonzero().squeeze(1).tolist() + [pos.numel()]
        return [b - a for a, b in itertools.pairwise(starts)]
    if "attention_mask" in kw:
        return kw["attention_mask"].sum(dim=1).cpu().tolist()
    return [mb.input_ids.shape[1]] * mb.input_ids.shape[0]


def micro_batch_flops(shape: FlopShape, mb: MicroBatch) -> float:
    """`training_flops` of one micro-batch, from host-side data only on the CPU."""
    return training_flops(shape, example_lengths(mb), mb.supervised_tokens)
