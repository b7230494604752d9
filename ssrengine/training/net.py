"""The trainable module: the model loaded for training, LoRA, gradient checkpointing,
`train.compile` and the FSDP2 / DDP wrap around `CausalLMLoss`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.models.attention import compute_dtype, recompute_with_packed_bounds
from ssrengine.models.layers import decoder_layers
from ssrengine.models.loading import load_model
from ssrengine.training import distributed
from ssrengine.training.loss import CausalLMLoss


def is_fsdp(cfg: Config, world: distributed.World) -> bool:
    return world.size > 1 and cfg.train.parallel == "fsdp"


def bf16_dtypes(
    cfg: Config, world: distributed.World
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(FSDP2 param dtype, autocast dtype), decided once: bf16 compute comes from FSDP2's
    mixed-precision policy when sharded, from torch.autocast otherwise, never from both;
    fp16 from torch.autocast (with a GradScaler, `grad_scaler`)."""
    compute = compute_dtype(cfg.train.dtype, world.device)
    if compute == "float16":
        check_float16(cfg, world)
        return None, torch.float16
    if compute != "bfloat16":
        return None, None
    return (torch.bfloat16, None) if is_fsdp(cfg, world) else (None, torch.bfloat16)


def check_float16(cfg: Config, world: distributed.World) -> None:
    """train.dtype = float16 needs fp32 master weights (GradScaler unscales fp32 gradients
    only) and gradients that are whole on every rank: FSDP2 shards them, so each rank's
    scaler would see its own overflows and skip other steps than its peers."""
    if cfg.model.dtype != "float32":
        raise InputError(
            f"train.dtype = float16 trains fp32 master weights under fp16 autocast; "
            f"model.dtype is {cfg.model.dtype}: set it to float32",
            field="model.dtype",
        )
    if is_fsdp(cfg, world):
        raise InputError(
            "float16 with a gradient scaler needs whole gradients on every rank: use "
            "train.parallel = ddp (FSDP2 shards them), or bfloat16 on a GPU that has it",
            field="train.dtype",
        )


def grad_scaler(autocast: torch.dtype | None, device: torch.device) -> Any:
    """A dynamic loss scale for fp16 autocast (torch.amp.GradScaler: starts at 2^16, halves
    on an overflow, doubles after 2,000 steps without one); None for any other dtype."""
    if autocast != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def compile_blocks(model: Any) -> None:
    """train.compile: `torch.compile` each decoder layer whole, with a dynamic token count.

    Inductor fuses the layer's elementwise work (RMSNorms, RoPE, SiLU x up, the residual adds)
    around the matmuls, and its partitioner recomputes cheap elementwise results in the
    backward instead of keeping them (norm outputs, SiLU x up): less activation memory and
    fewer passes over it. ``sdpa_varlen`` runs as an eager island (registered with
    `torch.compiler.disable`) and takes the packed row's boundaries from a context
    (`attention.packed_bounds`), not from the layer's kwargs, which the graph would guard on:
    one recompile per packing. All layers share their code, so the layer compiles once
    (dynamic=True: no recompile per length)."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


def enable_checkpointing(model: Any) -> None:
    """train.gradient_checkpointing: each decoder layer's activations recomputed in the backward.

    Non-reentrant (works with frozen inputs, LoRA, and with FSDP2's unshard hooks), with a
    ``context_fn`` whose recompute context re-enters the forward's `attention.packed_bounds`:
    the recompute runs in the backward, outside the block that set them."""
    kwargs = {"use_reentrant": False, "context_fn": recompute_with_packed_bounds}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(cfg: Config, world: distributed.World) -> tuple[Any, Any, nn.Module]:
    """(transformers model, peft model or None, the trainable module: wrapped CausalLMLoss)."""
    t = cfg.train
    fsdp = is_fsdp(cfg, world)
    compute = compute_dtype(t.dtype, world.device)
    model = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        # FSDP2: load on the CPU; fully_shard moves only this rank's shards to the device.
        device="cpu" if fsdp else str(world.device),
        attn_implementation=cfg.model.attn_implementation,
        autocast=compute,
        # Chosen for the training device (an FSDP2 model is loaded on the CPU first).
        attn_device=str(world.device),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    peft_model = None
    if t.lora:
        from ssrengine.models import lora

        peft_model = lora.apply(model, t)
        model = peft_model.get_base_model()  # the same transformers model, adapters inside
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    if t.compile:
        compile_blocks(model)
    model.train()
    net = distributed.wrap(
        CausalLMLoss(
            model,
            t.loss_impl,
            t.loss_grad_filter,
            memory_budget=t.compile_memory_budget if t.compile else None,
            unlikelihood=t.unlikelihood_weight,
        ),
        world,
        t.parallel,
        layers=decoder_layers(model) if fsdp else [],
        param_dtype=bf16_dtypes(cfg, world)[0],
    )
    return model, peft_model, net
