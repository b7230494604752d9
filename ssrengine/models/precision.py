"""The dtype a model computes in on a GPU, for inference as for training, and TF32.

Training's ``train.dtype = "auto"`` (`ssrengine.models.attention.compute_dtype`) is bf16 autocast
over fp32 weights on CUDA GPUs that have bf16 (compute capability 8.0 and newer), fp32
elsewhere. Generation (the ``hf`` backend), eval and retention scoring use that same precision
(`inference_dtype`): without it an fp32 model on an A100 runs its matmuls on CUDA cores, about
19.5 instead of 312 TFLOPS. fp32 matmuls that remain (``train.dtype = "float32"``, weights a
caller keeps in fp32) use TF32 tensor cores on Ampere and newer (`enable_tf32`), as cuBLAS
would have them unless PyTorch turned it off by default.

Each decision is a pure function of the device's compute capability, so the CPU tests check
it; `enable_tf32` and `autocast_for` apply it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Compute capability from which a GPU has bf16 and TF32 tensor cores (Ampere).
AMPERE = (8, 0)


def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``; None for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def has_bf16(cap: tuple[int, int] | None) -> bool:
    """bf16 tensor cores: a GPU of compute capability 8.0 or newer. (torch.cuda's
    is_bf16_supported also counts emulation on older GPUs, which is slower than fp32.)"""
    return cap is not None and cap >= AMPERE


def wants_tf32(cap: tuple[int, int] | None) -> bool:
    """TF32 for fp32 matmuls: Ampere and newer (older GPUs have no TF32)."""
    return cap is not None and cap >= AMPERE


def inference_dtype(weights: torch.dtype, cap: tuple[int, int] | None) -> str:
    """The autocast dtype inference runs under: "bfloat16" for fp32 weights on a GPU with bf16
    (training's ``auto``), else "float32" = no autocast (the CPU, older GPUs, and 16-bit
    weights, which compute in their own dtype)."""
    return "bfloat16" if weights == torch.float32 and has_bf16(cap) else "float32"


def model_inference_dtype(model: Any) -> str:
    """`inference_dtype` for a loaded model (its first parameter's dtype and device)."""
    p = next(model.parameters())
    return inference_dtype(p.dtype, capability(p.device))


def enable_tf32(device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions use TF32 on ``device`` when it is Ampere or newer
    (a process-wide setting, PyTorch's "high" float32 matmul precision); whether it did."""
    if not wants_tf32(capability(device)):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """torch.autocast in ``dtype`` on ``device``; no context for "float32"."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def model_autocast(model: Any) -> contextlib.AbstractContextManager:
    """The inference autocast of a loaded model (`model_inference_dtype`)."""
    return autocast_for(next(model.parameters()).device, model_inference_dtype(model))
