"""The train stage: rehearsal.jsonl → checkpoints/step-N and metrics.jsonl.

Three pieces, as in torchtitan: `setup` builds model, optimizer, schedule and data stream from
the config (restoring a checkpoint through `ssrengine.checkpoint`); `train_step` is one
optimizer step; `train` is the loop around it (metrics, progress, checkpoints, save on Ctrl-C).

Loss normalization (torchtitan/torchtune): count the supervised tokens of the whole optimizer
step first — all micro-batches, all ranks (one all-reduce) — sum-reduce each micro-batch's loss
and divide by that count; never average micro-batch means (the 2024 gradient-accumulation bug).

Data parallelism (ssrengine.distributed; `torchrun --nproc-per-node W`): with grad_accum = A,
optimizer step s uses the global micro-batches [s·A·W, (s+1)·A·W) of `MicroBatchStream`, rank r
taking every W-th one from r. W ranks × A micro-batches thus train on exactly the batches of
1 rank × (A·W) micro-batches, and give the same losses and weights up to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ssrengine import IGNORE_INDEX, distributed
from ssrengine.attention import compute_dtype, pick_attn_implementation
from ssrengine.batching import MicroBatch, encode_rows, micro_batches
from ssrengine.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    read_trainer_state,
    save_checkpoint,
)
from ssrengine.config import Config
from ssrengine.errors import InputError
from ssrengine.io import atomic_write_jsonl
from ssrengine.models import hidden_and_head, load_model, load_tokenizer
from ssrengine.rundir import MetricRow, RehearsalRow, RunDir, read_typed

log = logging.getLogger(__name__)


def loss_sum(model: Any, mb: MicroBatch, impl: str = "auto") -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of one micro-batch.

    The one place the loss is computed: ``impl`` selects the fused kernel (never builds the
    [tokens, vocab] logits) or ``naive`` (full logits + F.cross_entropy, the reference)."""
    hidden, weight = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels = mb.labels.reshape(-1)  # (N,)
    if impl == "naive":
        logits = (hidden @ weight.T).float()  # (N, V)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    from ssrengine.kernels import fused_linear_cross_entropy

    # Labels come from our own tokenization; the range check costs a host sync, so it runs
    # only where syncs are free (CPU).
    return fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum", impl=impl,
        validate=hidden.device.type == "cpu",
    )  # fmt: skip


class CausalLMLoss(nn.Module):
    """A transformers model and `loss_sum` as one module: the unit FSDP2 and DDP wrap.

    Both act in the root module's forward — FSDP2 unshards the root's parameters (embeddings,
    lm_head) for it, DDP arms its gradient all-reduce — so the loss must run inside it; there
    `hidden_and_head` returns the full [V, H] lm_head weight, never a DTensor shard."""

    def __init__(self, model: Any, impl: str = "auto") -> None:
        super().__init__()
        self.model, self.impl = model, impl

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        return loss_sum(self.model, mb, self.impl)


def accumulate(
    model: Any,
    mbs: list[MicroBatch],
    *,
    impl: str = "auto",
    autocast: Any = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this rank's micro-batches of one optimizer step.

    ``model``: a transformers model, or a `CausalLMLoss` (wrapped by FSDP2/DDP or not). Returns
    (summed loss, supervised tokens) of the whole step over all ranks, as 0-d tensors. FSDP2
    and DDP average gradients over ranks, hence the factor ``world_size`` in the normalizer."""
    if not isinstance(distributed.unwrap(model), CausalLMLoss):
        model = CausalLMLoss(model, impl)
    device = next(model.parameters()).device
    n_sup = distributed.all_sum(
        torch.tensor(sum(mb.supervised_tokens for mb in mbs), device=device)
    )
    norm = n_sup.clamp(min=1).float() / world_size
    total = torch.zeros((), device=device)
    ddp = isinstance(model, DistributedDataParallel)
    for i, mb in enumerate(mbs):
        # DDP: all-reduce the gradients once, in the last micro-batch's backward.
        with model.no_sync() if ddp and i < len(mbs) - 1 else nullcontext():
            with autocast or nullcontext():
                loss = model(_to(mb, device))
            (loss / norm).backward()
        total += loss.detach()
    return distributed.all_sum(total), n_sup


def lr_lambda(cfg: Config) -> Any:
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


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


def _to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.model_kwargs.items()}
    return dataclasses.replace(
        mb, input_ids=mb.input_ids.to(device), labels=mb.labels.to(device), model_kwargs=kw
    )


def _fsdp(cfg: Config, world: distributed.World) -> bool:
    return world.size > 1 and cfg.train.parallel == "fsdp"


def _bf16(cfg: Config, world: distributed.World) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(FSDP2 param dtype, autocast dtype), decided once: bf16 compute comes from FSDP2's
    mixed-precision policy when sharded, from torch.autocast otherwise, never from both."""
    if compute_dtype(cfg.train.dtype, world.device) != "bfloat16":
        return None, None
    return (torch.bfloat16, None) if _fsdp(cfg, world) else (None, torch.bfloat16)


def compile_blocks(model: Any) -> None:
    """train.compile: `torch.compile` each decoder block in place. The blocks share one code
    object, so all layers reuse one compiled graph (parameters are graph inputs); varlen
    attention reads host boundaries and runs eager between the compiled parts."""
    for layer in distributed.decoder_layers(model):
        layer.compile()


def build_model(cfg: Config, world: distributed.World) -> tuple[Any, Any, nn.Module]:
    """(transformers model, peft model or None, the trainable module: wrapped CausalLMLoss)."""
    t = cfg.train
    fsdp = _fsdp(cfg, world)
    compute = compute_dtype(t.dtype, world.device)
    model = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        # FSDP2: load on the CPU; fully_shard moves only this rank's shards to the device.
        device="cpu" if fsdp else str(world.device),
        # Chosen for the training device (an FSDP2 model is loaded on the CPU first).
        attn_implementation=pick_attn_implementation(
            cfg.model.attn_implementation, world.device, weights=cfg.model.dtype, autocast=compute
        ),
        autocast=compute,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    peft_model = None
    if t.lora:
        from ssrengine import lora

        peft_model = lora.apply(model, t)
        model = peft_model.get_base_model()  # the same transformers model, adapters inside
    if t.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with FSDP2's unshard hooks.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if t.compile:
        compile_blocks(model)
    model.train()
    net = distributed.wrap(
        CausalLMLoss(model, t.loss_impl),
        world,
        t.parallel,
        layers=distributed.decoder_layers(model) if fsdp else [],
        param_dtype=_bf16(cfg, world)[0],
    )
    return model, peft_model, net


def _adamw_impl(params: list[nn.Parameter], device: torch.device) -> dict[str, bool]:
    """CPU: the fused AdamW kernel (plain tensors only; FSDP2's DTensors keep the loop): for
    SmolLM2 0.17 s of CPU per step against 0.84 s for the per-parameter loop, and none of the
    loop's (+0.22 GB) or foreach's (+0.53 GB) temporaries. CUDA: foreach, as before."""
    if device.type == "cpu" and all(type(p) is nn.Parameter for p in params):
        return {"fused": True}
    return {"foreach": device.type == "cuda"}


def build_optimizer(
    cfg: Config, net: nn.Module, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on vectors: norms, biases) and warmup + cosine."""
    t = cfg.train
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        **_adamw_impl(params, device),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


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

    def save(self, **extra: Any) -> Path:
        """Checkpoint step-``step`` (collective); ``extra`` goes into trainer_state.json."""
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
            extra={"micro_batches": self.consumed, **extra},
            keep=self.cfg.train.keep_checkpoints,
        )


@dataclass(frozen=True)
class StepStats:
    """One optimizer step over all ranks, read back to the host once."""

    loss: float  # summed loss / supervised tokens
    lr: float  # the learning rate the step used
    supervised_tokens: int
    tokens: int
    grad_norm: float


def _check(cfg: Config) -> None:
    t = cfg.train
    if t.packing and t.max_tokens < cfg.data.max_seq_len:
        raise InputError(
            f"train.max_tokens={t.max_tokens} is smaller than data.max_seq_len={cfg.data.max_seq_len}",
            field="train.max_tokens",
        )


def _rehearsal_rows(rd: RunDir) -> list[RehearsalRow]:
    if not rd.rehearsal.exists():
        raise InputError("missing; run the build stage first", file=str(rd.rehearsal))
    return list(read_typed(rd.rehearsal, RehearsalRow))


def setup(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[RehearsalRow] | None = None,
    resume: Path | None = None,
) -> Trainer:
    """Model, optimizer, schedule and data from the config; restored from ``resume`` (a
    checkpoint dir) when given. ``rows`` default to run_dir/rehearsal.jsonl. Collective."""
    _check(cfg)
    world = distributed.init(cfg.model.device)
    torch.manual_seed(
        cfg.train.seed
    )  # the same on every rank: FSDP2 does not broadcast new weights
    rd = RunDir(run_dir)
    rows = _rehearsal_rows(rd) if rows is None else rows
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model, peft_model, net = build_model(cfg, world)
    encoded = encode_rows(rows, tokenizer, cfg.data, file=str(rd.rehearsal))
    opt, sched = build_optimizer(cfg, net, world.device)
    tr = Trainer(
        cfg=cfg,
        world=world,
        ckpt_root=rd.checkpoints,
        hf_model=model,
        peft_model=peft_model,
        net=net,
        tokenizer=tokenizer,
        optimizer=opt,
        scheduler=sched,
        stream=MicroBatchStream(encoded, cfg, tokenizer.pad_token_id),
        autocast=_bf16(cfg, world)[1],
    )
    if resume is not None:
        state = load_trainer_state(resume, model=net, optimizer=opt, scheduler=sched)
        tr.step = state["step"]
        tr.consumed = state.get("micro_batches", tr.step * cfg.train.grad_accum)
        log.info("resuming from %s (step %d, %d ranks)", resume, tr.step, world.size)
    return tr


def train_step(tr: Trainer) -> StepStats:
    """One optimizer step: this rank's micro-batches, accumulate, clip, step, advance."""
    t, world = tr.cfg.train, tr.world
    mbs = rank_micro_batches(tr.stream, tr.consumed, t.grad_accum, world)
    autocast = torch.autocast(world.device.type, dtype=tr.autocast) if tr.autocast else None
    total, n_sup = accumulate(
        tr.net, mbs, impl=t.loss_impl, autocast=autocast, world_size=world.size
    )
    params = [p for p in tr.net.parameters() if p.requires_grad]
    clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    lr = tr.optimizer.param_groups[0]["lr"]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    tr.consumed += t.grad_accum * world.size
    real = distributed.all_sum(
        torch.tensor(float(sum(mb.real_tokens for mb in mbs)), device=world.device)
    )
    # One host sync per step, for logging.
    stats = torch.stack([total, n_sup.float(), real, distributed.full_value(grad_norm).float()])
    loss_sum_v, n_sup_v, real_v, grad_norm_v = stats.tolist()
    return StepStats(
        loss=loss_sum_v / max(n_sup_v, 1),
        lr=lr,
        supervised_tokens=int(n_sup_v),
        tokens=int(real_v),
        grad_norm=grad_norm_v,
    )


def _metrics_row(tr: Trainer, s: StepStats, dt: float) -> MetricRow:
    return MetricRow(
        step=tr.step,
        loss=round(s.loss, 6),
        lr=s.lr,
        supervised_tokens=s.supervised_tokens,
        tokens=s.tokens,
        tokens_per_s=round(s.tokens / dt, 2),
        grad_norm=round(s.grad_norm, 6),
        step_time_s=round(dt, 4),
        epoch=(tr.consumed - 1) // tr.stream.per_epoch,
        world_size=tr.world.size,
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint we resume from: they will be recomputed."""
    old = [r for r in read_typed(path, MetricRow) if r.step <= step] if path.exists() else []
    atomic_write_jsonl(path, [r.to_json() for r in old])


def train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[RehearsalRow] | None = None,
    require_resume: bool = False,
) -> Path:
    """Train on ``rows`` (default: run_dir/rehearsal.jsonl); returns the final checkpoint dir.

    Resumes from the newest complete checkpoint in run_dir/checkpoints; a finished run is a no-op.
    Under torchrun every rank calls it; metrics and progress come from rank 0."""
    t = cfg.train
    ckpt_root = RunDir(run_dir).checkpoints
    latest = latest_checkpoint(ckpt_root)
    if require_resume and latest is None:
        raise InputError(
            "--resume given but there is no checkpoint to resume from", file=str(ckpt_root)
        )
    if latest is not None and read_trainer_state(latest)["step"] >= t.max_steps:
        log.info("training already finished: %s", latest)
        return latest
    tr = setup(cfg, run_dir, rows=rows, resume=latest)
    main = tr.world.is_main
    metrics_path = RunDir(run_dir).metrics
    if main:
        _truncate_metrics(metrics_path, tr.step)
    start, final = tr.step, None
    bar = tqdm(
        total=t.max_steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        **({} if main else {"disable": True}),  # TQDM_DISABLE still works on rank 0
    )
    with open(metrics_path, "a") if main else nullcontext() as mf:
        try:
            while tr.step < t.max_steps:
                t0 = time.perf_counter()
                s = train_step(tr)
                dt = time.perf_counter() - t0
                if main:
                    mf.write(json.dumps(_metrics_row(tr, s, dt).to_json()) + "\n")
                    mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{s.loss:.4f}", tok_s=f"{s.tokens / dt:.0f}")
                if tr.step == t.max_steps or (t.save_every and tr.step % t.save_every == 0):
                    final = tr.save(final_loss=s.loss)
        except KeyboardInterrupt:
            # Ranks are interrupted at different points; a collective save could hang.
            if tr.step > start and tr.world.size == 1:
                log.warning("interrupted: saving step %d so a rerun resumes here", tr.step)
                tr.save(interrupted=True)
            raise
        finally:
            bar.close()
    assert final is not None
    return final
