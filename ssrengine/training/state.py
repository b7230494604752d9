"""Where a training run is: the micro-batch stream, `Trainer` (everything a step needs, and
its checkpoint save) and `StepStats` (one optimizer step, read back once).

Data parallelism (`torchrun --nproc-per-node W`): with grad_accum = A, optimizer step s uses the
global micro-batches [s·A·W, (s+1)·A·W) of `MicroBatchStream`, rank r taking every W-th one
from r. W ranks × A micro-batches thus train on exactly the batches of 1 rank × (A·W)
micro-batches, and give the same losses and weights up to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.training import distributed
from ssrengine.training.batching import MicroBatch, micro_batches
from ssrengine.training.checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class MicroBatchStream:
    """The infinite sequence of micro-batches: epoch e is a seeded shuffle; index k is
    (k // per_epoch, k % per_epoch). Resuming needs only k."""

    def __init__(self, encoded: list[Any], cfg: Config, pad_id: int) -> None:
        self.encoded, self.cfg, self.pad_id = encoded, cfg, pad_id
        self._epoch, self._batches = -1, []
        self.per_epoch = len(micro_batches(encoded, cfg.train, epoch=0, pad_id=pad_id))

    def __getitem__(self, k: int) -> MicroBatch:
        epoch = k // self.per_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = micro_batches(
                self.encoded, self.cfg.train, epoch=epoch, pad_id=self.pad_id
            )
        return self._batches[k % self.per_epoch]


def rank_micro_batches(
    stream: MicroBatchStream, consumed: int, accum: int, world: distributed.World
) -> list[MicroBatch]:
    """This rank's share of the next optimizer step: global indices consumed + r + W·i."""
    return [stream[consumed + world.rank + world.size * i] for i in range(accum)]


@dataclass
class Trainer:
    """Everything a training step needs, built by `setup`; ``step`` and ``consumed`` (global
    micro-batches, the data position) are where the run is."""

    cfg: Config
    world: distributed.World
    ckpt_root: Path
    hf_model: Any  # the transformers model inside ``net``
    peft_model: Any  # LoRA: its peft wrapper; else None
    net: nn.Module  # the trainable module: CausalLMLoss, wrapped by FSDP2/DDP or not
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: MicroBatchStream
    autocast: torch.dtype | None
    step: int = 0
    consumed: int = 0
    eval_batches: list[MicroBatch] = dataclasses.field(default_factory=list)
    skipped: int = 0  # non-finite steps skipped so far in this run
    scaler: Any = None  # torch.amp.GradScaler under train.dtype = float16, else None
    stop_signal: int = 0  # set by `StopRequests`: a signal asked this rank to stop

    def save(self, **extra: Any) -> Path:
        """Checkpoint step-``step`` (collective); ``extra`` goes into trainer_state.json.
        Refuses (InputError) weights that are not all finite."""
        from torch.distributed.tensor import DTensor

        # This rank's shards under FSDP2; the all-reduce covers the others.
        params = [p.to_local() if isinstance(p, DTensor) else p for p in self.net.parameters()]
        bad = torch.stack([(~torch.isfinite(p.detach())).any() for p in params]).any().float()
        if distributed.all_sum(bad).item():
            raise InputError(
                f"step {self.step}: the weights are not finite; not saved (the last checkpoint "
                "stays resumable: lower train.lr or train.max_grad_norm)",
                field="train.lr",
            )
        log.info("saving checkpoint step-%d ...", self.step)
        return save_checkpoint(
            self.ckpt_root,
            self.step,
            model=self.net,
            hf_model=self.hf_model,
            peft_model=self.peft_model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            cfg=self.cfg,
            extra={
                "micro_batches": self.consumed,
                "nonfinite_skipped": self.skipped,
                # the loss scale goes on where it was (float16): no new overflows to find it
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler else {}),
                **extra,
            },
            keep=self.cfg.train.keep_checkpoints,
            merged=self.step >= self.cfg.train.max_steps,  # LoRA: merged model at the end only
        )


@dataclass(frozen=True)
class StepStats:
    """One optimizer step over all ranks, read back to the host once."""

    loss: float  # summed loss / supervised tokens
    lr: float  # the learning rate the step used
    supervised_tokens: int
    tokens: int
    grad_norm: float
    applied: bool = True  # False: loss or grad norm not finite, the optimizer step was skipped
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM)
