"""Optimizer, learning-rate schedule and run length from the train config.

Run length: train.max_steps when it is above 0; else train.epochs passes over the rehearsal
set, counted in micro-batches as the trainer draws them (`total_steps`). Schedule: linear
warmup over train.warmup_steps, then cosine or linear decay to train.min_lr_ratio × train.lr at
the last step, or constant (`lr_factor`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ssrengine.core.config import Config, TrainConfig

log = logging.getLogger(__name__)


def total_steps(t: TrainConfig, micro_batches_per_epoch: int, world_size: int) -> int:
    """Optimizer steps of the run: train.max_steps, or (max_steps = 0) enough steps of
    grad_accum × world_size micro-batches each to draw train.epochs × micro_batches_per_epoch
    micro-batches, rounded up (the last step may reach into the next epoch's shuffle)."""
    if t.max_steps > 0:
        return t.max_steps
    per_step = t.grad_accum * world_size
    return max(1, math.ceil(t.epochs * micro_batches_per_epoch / per_step - 1e-9))


def resolve_steps(cfg: Config, micro_batches_per_epoch: int, world_size: int) -> Config:
    """``cfg`` with train.max_steps resolved (`total_steps`)."""
    steps = total_steps(cfg.train, micro_batches_per_epoch, world_size)
    if steps != cfg.train.max_steps:
        log.info(
            "train.epochs=%g: %d optimizer steps (%d micro-batches per epoch, %d per step)",
            cfg.train.epochs,
            steps,
            micro_batches_per_epoch,
            cfg.train.grad_accum * world_size,
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def planned_steps(cfg: Config, ckpt: Path) -> int:
    """The run's length before the data is read: train.max_steps, or the one a checkpoint of
    the same run resolved from train.epochs (its run_config.json holds the resolved config)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    saved = json.loads((ckpt / "run_config.json").read_text())
    return int(saved["train"]["max_steps"])


def lr_factor(t: TrainConfig, steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of train.lr."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_scheduler == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def build_optimizer(
    t: TrainConfig, net: nn.Module, device: torch.device, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (no weight decay on vectors: norms, biases) and the
    schedule of a ``steps``-step run."""
    params = [p for p in net.parameters() if p.requires_grad]
    fused = t.optimizer == "adamw_fused"
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        # fused and foreach are exclusive; foreach pays off only on CUDA.
        foreach=None if fused else device.type == "cuda",
        fused=fused or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(t, steps, step))
    return opt, sched
