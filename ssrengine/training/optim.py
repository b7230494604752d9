"""Optimizer, learning-rate schedule and run length from the train config.

Run length: train.max_steps when it is above 0; else (the default) train.epochs passes over
the rehearsal set, counted in micro-batches as the trainer draws them (`total_steps`).

Schedule (`lr_factor`), for a run of S optimizer steps numbered 1..S with W warmup steps
(train.warmup_steps, or ceil(train.warmup_ratio × S)): step s <= W runs at s / W × train.lr,
so step W is the first at the peak; the decay then runs from the peak (step max(W, 1)) to
train.min_lr_ratio × train.lr at step S exactly (cosine or linear), or stays at the peak
(constant). An extended run (train.max_steps or train.epochs raised after it finished) uses
the schedule of its new length from the step it resumes at: as if planned that long.

Optimizer (`make_optimizer`): AdamW by default (train.adam_*), or any `torch.optim` class by
name, built with train.lr, train.weight_decay on matrices and train.optimizer_kwargs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssrengine.core.config import Config, TrainConfig
from ssrengine.core.errors import InputError

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
            "train.epochs=%g: %s (%s per epoch, %d per step)",
            cfg.train.epochs,
            plural(steps, "optimizer step"),
            plural(micro_batches_per_epoch, "micro-batch"),
            cfg.train.grad_accum * world_size,
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def plural(n: int, noun: str) -> str:
    """``1 rank``, ``2 ranks``, ``1 micro-batch``, ``3 micro-batches``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("ch", "sh", "s", "x")) else f"{n} {noun}s"


def planned_steps(cfg: Config, ckpt: Path) -> int | None:
    """The run's length before the data is read: train.max_steps, or the one a checkpoint of
    the same run resolved from the same train.epochs (its run_config.json holds the resolved
    config); None when train.epochs changed (only the data can tell the new length)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    saved = json.loads((ckpt / "run_config.json").read_text())["train"]
    if float(saved.get("epochs", cfg.train.epochs)) != cfg.train.epochs:
        return None
    return int(saved["max_steps"])


def warmup_steps(t: TrainConfig, steps: int) -> int:
    """Warmup steps of a ``steps``-step run: ceil(train.warmup_ratio × steps) when the ratio
    is above 0, else train.warmup_steps."""
    if t.warmup_ratio > 0:
        return math.ceil(t.warmup_ratio * steps - 1e-9)
    return t.warmup_steps


def lr_factor(t: TrainConfig, steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based: step + 1 in the module's
    numbering) as a fraction of train.lr."""
    warm = warmup_steps(t, steps)
    if step < warm:
        return (step + 1) / warm
    if t.lr_scheduler == "constant":
        return 1.0
    peak = max(warm - 1, 0)  # the 0-based step at the peak, where the decay starts
    progress = min(1.0, (step - peak) / max(1, steps - 1 - peak))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_scheduler == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def param_groups(t: TrainConfig, net: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters: weight decay on matrices only (not on norms and biases)."""
    params = [p for p in net.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The `torch.optim` optimizer called ``name`` (``adamw`` / ``adamw_fused``: AdamW)."""
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    known = sorted(
        n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n != "Optimizer"
    )
    raise InputError(
        f"{name!r} is not a torch.optim optimizer; known: adamw, adamw_fused, {', '.join(known)}",
        field="train.optimizer",
    )


def make_optimizer(t: TrainConfig, net: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer over `param_groups`, with train.lr and train.optimizer_kwargs (which
    override the train.adam_* defaults of AdamW)."""
    cls = optimizer_class(t.optimizer)
    kwargs: dict[str, Any] = {}
    if cls is torch.optim.AdamW:
        fused = t.optimizer == "adamw_fused"
        kwargs = {
            "betas": (t.adam_beta1, t.adam_beta2),
            "eps": t.adam_eps,
            # fused and foreach are exclusive; foreach pays off only on CUDA.
            "foreach": None if fused else device.type == "cuda",
            "fused": fused or None,
        }
    extra = json.loads(t.optimizer_kwargs or "{}")
    if "betas" in extra and isinstance(extra["betas"], list):
        extra["betas"] = tuple(extra["betas"])  # JSON has no tuples; torch checks betas' type
    kwargs.update(extra)
    try:
        return cls(param_groups(t, net), lr=t.lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"torch.optim.{cls.__name__} refused {json.dumps(extra)}: {e}",
            field="train.optimizer_kwargs",
        ) from None


def build_optimizer(
    t: TrainConfig, net: nn.Module, device: torch.device, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """train.optimizer (`make_optimizer`) and the schedule of a ``steps``-step run."""
    opt = make_optimizer(t, net, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(t, steps, step))
    return opt, sched


def sync_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a resume: set the learning rate of the next step from this run's schedule, not
    the one the checkpoint's optimizer state carries (an extended run has a new schedule)."""
    step = sched.last_epoch
    for group, base, fn in zip(
        sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
    ):
        group["lr"] = base * fn(step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
