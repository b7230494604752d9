"""Model FLOPs of a training step and MFU (model FLOPs utilization) on known GPUs.

A trained token costs (forward + backward = 3 × the forward's 2 FLOPs per weight):

    6 · P                 P = the decoder's matmul weights (q, k, v, o, MLP) — every real token
  + 6 · V · H             the lm_head — supervised tokens only: the fused loss never computes
                          the other rows' logits
  + 12 · L · heads · d    per causal (query, key) pair of each example (QKᵀ and AV): packed or
                          padded, an example of n tokens has n(n + 1)/2 pairs, never more

Norms, rotary embeddings and the softmax are left out (elementwise, not matmuls), as are the
recomputed forwards of activation checkpointing: MFU counts the model's work, not the run's.
LoRA counts the full 6·P too (its frozen weights still take the forward and the input-gradient
backward; the usual convention). MFU = step FLOPs / (step time × peak FLOP/s × ranks).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Dense peak FLOP/s per GPU (vendor data sheets, no structured sparsity): (bf16/fp16 tensor
# cores with fp32 accumulate, TF32 tensor cores, plain fp32). First match of the name wins,
# so longer names come before their prefixes (A100 before A10, L40S before L40 before L4).
PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float] | None], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989e12, 495e12, 67e12)),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", (989e12, 495e12, 67e12)),  # before "H200", which its name contains
    ("H200 NVL", (835e12, 418e12, 60e12)),  # data sheet: 1,671 / 835 sparse, 60 FP32
    ("H200", (989e12, 495e12, 67e12)),  # SXM
    ("A100", (312e12, 156e12, 19.5e12)),
    ("A10G", None),  # AWS's A10 variant: no vendor data sheet for its tensor-core peak
    ("A10", (125e12, 62.5e12, 31.2e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L40", (181e12, 90.5e12, 90.5e12)),
    ("L4", (121e12, 60e12, 30.3e12)),
    ("RTX 4090", (165e12, 82.6e12, 82.6e12)),
    # "NVIDIA Ampere GA102 GPU Architecture" whitepaper, its RTX 3090 column: dense BF16 and
    # FP16 tensor with FP32 accumulate 71 TFLOPS (GeForce runs it at half the 142 of FP16
    # accumulate), TF32 tensor 35.6, FP32 35.6.
    ("RTX 3090", (71e12, 35.6e12, 35.6e12)),
    ("RTX A6000", (155e12, 77.4e12, 38.7e12)),
)


def peak_flops_for(name: str, dtype: str, *, tf32: bool = False) -> float | None:
    """Peak dense FLOP/s of the GPU called ``name`` (as torch.cuda.get_device_name gives it)
    in ``dtype`` ("bfloat16"/"float16" or "float32"; TF32 where fp32 matmuls may use it), or
    None for a GPU not in the table."""
    for key, peaks in PEAK_FLOPS:
        if key in name:
            if peaks is None:
                return None
            half, tf, fp32 = peaks
            return half if dtype in ("bfloat16", "float16") else tf if tf32 else fp32
    return None


@functools.cache
def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """`peak_flops_for` this device; None on the CPU (no reliable peak to divide by)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_flops_for(name, dtype, tf32=torch.backends.cuda.matmul.allow_tf32)


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs per unit of work of one decoder-only model (see the module doc)."""

    per_token: float  # 6 · P
    per_supervised_token: float  # 6 · V · H
    per_attention_pair: float  # 12 · L · heads · head_dim

    @classmethod
    def from_config(cls, config: Any) -> ModelFlops:
        """From a transformers config of a Llama-like model (GQA, gated MLP)."""
        h, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or h // heads
        attn = h * heads * d + 2 * h * kv * d + heads * d * h  # q, k, v, o
        mlp = 3 * h * config.intermediate_size  # gate, up, down
        return cls(
            per_token=6.0 * layers * (attn + mlp),
            per_supervised_token=6.0 * config.vocab_size * h,
            per_attention_pair=12.0 * layers * heads * d,
        )

    def batch(self, seq_lens: Sequence[int], supervised_tokens: int) -> float:
        """FLOPs of one micro-batch: examples of ``seq_lens`` real tokens each."""
        pairs = sum(n * (n + 1) // 2 for n in seq_lens)
        return (
            self.per_token * sum(seq_lens)
            + self.per_supervised_token * supervised_tokens
            + self.per_attention_pair * pairs
        )

    def step(self, micro_batches: Iterable[Any]) -> float:
        """FLOPs of an optimizer step over its micro-batches (all ranks' for the global step);
        each has ``seq_lens`` and ``supervised_tokens`` (`ssrengine.training.batching.MicroBatch`)."""
        return sum(self.batch(mb.seq_lens, mb.supervised_tokens) for mb in micro_batches)


def mfu(step_flops: float, seconds: float, peak: float | None, ranks: int = 1) -> float | None:
    """Achieved / peak FLOP/s over all ranks, or None where the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return step_flops / (seconds * peak * ranks)


def step_mfu(
    model_config: Any,
    micro_batches: Iterable[Any],
    seconds: float,
    device: torch.device,
    dtype: str,
    ranks: int = 1,
) -> float | None:
    """MFU of one optimizer step: its global ``micro_batches`` (every rank's) in ``seconds`` on
    ``ranks`` devices like ``device``, computing in ``dtype``; None on the CPU or an unknown GPU
    (then nothing is counted)."""
    peak = device_peak_flops(device, dtype)
    if peak is None:
        return None
    work = ModelFlops.from_config(model_config).step(micro_batches)
    return mfu(work, seconds, peak, ranks)
