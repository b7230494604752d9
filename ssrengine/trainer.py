"""The train stage: rehearsal.jsonl → checkpoints/step-N and metrics.jsonl.

Three pieces, as in torchtitan: `setup` builds model, optimizer, schedule and data stream from
the config (restoring a checkpoint through `ssrengine.checkpoint`); `train_step` is one
optimizer step; `train` is the loop around it (metrics, progress, checkpoints, interrupts).

Interrupts (SIGINT, SIGTERM) only set a flag while training (`StopRequests`); the loop acts on
it between steps, where step counter, data position, weights and optimizer state agree: it
saves that step (unless just saved) and raises `errors.Stopped` (exit 128 + signal). A second
signal stops at once, keeping the last complete checkpoint. Under torchrun the flag is summed over ranks in
the step's one all-reduce of statistics, so every rank stops after the same step.

Non-finite steps: the step's one host sync happens before the optimizer step, so a step whose
loss or gradient norm is not finite changes neither weights nor optimizer state; it is skipped
(train.skip_nonfinite_steps times in a run at most) or stops training with an InputError
naming the step. A checkpoint with non-finite weights is never written.

Loss normalization (torchtitan/torchtune): count the supervised tokens of the whole optimizer
step first — all micro-batches, all ranks (one all-reduce) — sum-reduce each micro-batch's loss
and divide by that count; never average micro-batch means (the 2024 gradient-accumulation bug).

Data parallelism (ssrengine.distributed; `torchrun --nproc-per-node W`): with grad_accum = A,
optimizer step s uses the global micro-batches [s·A·W, (s+1)·A·W) of `MicroBatchStream`, rank r
taking every W-th one from r. W ranks × A micro-batches thus train on exactly the batches of
1 rank × (A·W) micro-batches, and give the same losses and weights up to fp32 rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ssrengine import IGNORE_INDEX, distributed, flops, reporting, validation
from ssrengine.attention import (
    compute_dtype,
    pick_attn_implementation,
    recompute_with_packed_bounds,
)
from ssrengine.batching import MicroBatch, encode_rows, micro_batches
from ssrengine.checkpoint import (
    load_trainer_state,
    read_trainer_state,
    resumable_checkpoint,
    save_checkpoint,
)
from ssrengine.config import Config
from ssrengine.errors import InputError, Stopped
from ssrengine.io import atomic_write_jsonl
from ssrengine.models import hidden_and_head, load_model, load_tokenizer
from ssrengine.optim import build_optimizer, planned_steps, resolve_steps
from ssrengine.rundir import MetricRow, RehearsalRow, RunDir, read_typed

log = logging.getLogger(__name__)


def loss_sum(
    model: Any, mb: MicroBatch, impl: str = "auto", grad_filter: bool = False
) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of one micro-batch, each token times its
    `MicroBatch.token_weights` where the batch has them (`ssrengine.loss_weights`).

    The one place the loss is computed: ``impl`` selects the fused kernel (never builds the
    [tokens, vocab] logits) or ``naive`` (full logits + F.cross_entropy, the reference);
    ``grad_filter``: the fused kernel's gradient filtering (train.loss_grad_filter)."""
    hidden, weight = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels = mb.labels.reshape(-1)  # (N,)
    tw = None if mb.token_weights is None else mb.token_weights.reshape(-1)
    if impl == "naive":
        logits = (hidden @ weight.T).float()  # (N, V)
        if tw is None:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return (ce * tw).sum()
    from ssrengine.kernels import fused_linear_cross_entropy

    # Labels come from our own tokenization; the range check costs a host sync, so it runs
    # only where syncs are free (CPU).
    return fused_linear_cross_entropy(
        hidden, weight, labels, token_weights=tw, ignore_index=IGNORE_INDEX, reduction="sum",
        impl=impl, validate=hidden.device.type == "cpu", grad_filter=grad_filter,
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
    ) -> None:
        super().__init__()
        self.model, self.impl, self.grad_filter = model, impl, grad_filter
        self.memory_budget = memory_budget  # train.compile_memory_budget; None: not compiled

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        # Compiled layers are partitioned on their first forward, under this budget.
        budget = (
            contextlib.nullcontext()
            if self.memory_budget is None
            else functorch_config.patch(activation_memory_budget=self.memory_budget)
        )
        with budget:
            return loss_sum(self.model, mb, self.impl, self.grad_filter)


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
    (summed loss, normalizer) of the whole step over all ranks, as 0-d tensors: the normalizer is
    the supervised-token count, or with loss weights their sum. FSDP2 and DDP average gradients
    over ranks, hence the factor ``world_size`` in the normalizer."""
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
                loss = model(_to(mb, device))
            (loss / norm).backward()
        total += loss.detach()
    return distributed.all_sum(total), n_sup


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
    tw = None if mb.token_weights is None else mb.token_weights.to(device)
    return dataclasses.replace(
        mb,
        input_ids=mb.input_ids.to(device),
        labels=mb.labels.to(device),
        model_kwargs=kw,
        token_weights=tw,
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
    """train.compile: `torch.compile` each decoder layer whole, with a dynamic token count.

    Inductor fuses the layer's elementwise work (RMSNorms, RoPE, SiLU x up, the residual adds)
    around the matmuls, and its partitioner recomputes cheap elementwise results in the
    backward instead of keeping them (norm outputs, SiLU x up): less activation memory and
    fewer passes over it. ``sdpa_varlen`` runs as an eager island (registered with
    `torch.compiler.disable`) and takes the packed row's boundaries from a context
    (`attention.packed_bounds`), not from the layer's kwargs, which the graph would guard on:
    one recompile per packing. All layers share their code, so the layer compiles once
    (dynamic=True: no recompile per length)."""
    for layer in distributed.decoder_layers(model):
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
        ),
        world,
        t.parallel,
        layers=distributed.decoder_layers(model) if fsdp else [],
        param_dtype=_bf16(cfg, world)[0],
    )
    return model, peft_model, net


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
            extra={"micro_batches": self.consumed, "nonfinite_skipped": self.skipped, **extra},
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
    applied: bool = True  # False: loss or grad norm not finite, the optimizer step was skipped
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM)


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
    rows, eval_rows = validation.split(cfg, _rehearsal_rows(rd) if rows is None else rows)
    tokenizer = load_tokenizer(
        cfg.model.path,
        trust_remote_code=cfg.model.trust_remote_code,
        chat_template=cfg.model.chat_template,
    )
    model, peft_model, net = build_model(cfg, world)
    encoded = encode_rows(rows, tokenizer, cfg.data, file=str(rd.rehearsal))
    stream = MicroBatchStream(encoded, cfg, tokenizer.pad_token_id)
    cfg = resolve_steps(cfg, stream.per_epoch, world.size)
    opt, sched = build_optimizer(cfg.train, net, world.device, cfg.train.max_steps)
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
        stream=stream,
        autocast=_bf16(cfg, world)[1],
        eval_batches=[
            _to(mb, world.device) for mb in validation.batches(cfg, eval_rows, tokenizer)
        ],
    )
    if resume is not None:
        state = load_trainer_state(resume, model=net, optimizer=opt, scheduler=sched)
        tr.step = state["step"]
        tr.consumed = state.get("micro_batches", tr.step * cfg.train.grad_accum)
        tr.skipped = state.get("nonfinite_skipped", 0)
        log.info("resuming from %s (step %d, %d ranks)", resume, tr.step, world.size)
    return tr


def train_step(tr: Trainer) -> StepStats:
    """One optimizer step: this rank's micro-batches, accumulate, clip, step, advance.

    The data position always advances; the optimizer step, the schedule and ``tr.step`` only
    when loss and gradient norm are finite (``applied``)."""
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
    # Real tokens, supervised tokens and stop requests of all ranks in one all-reduce.
    summed = distributed.all_sum(
        torch.tensor(
            [
                float(sum(mb.real_tokens for mb in mbs)),
                float(sum(mb.supervised_tokens for mb in mbs)),
                float(tr.stop_signal > 0),
            ],
            device=world.device,
        )
    )
    # The one host sync per step, before the optimizer step: it decides whether to apply it.
    # The loss is per unit of weight (per supervised token when unweighted).
    stats = torch.cat(
        [torch.stack([total, n_sup.float(), distributed.full_value(grad_norm).float()]), summed]
    )
    loss_sum_v, n_sup_v, grad_norm_v, real_v, n_tok_v, stop_v = stats.tolist()
    applied = math.isfinite(loss_sum_v) and math.isfinite(grad_norm_v)
    if applied:
        tr.optimizer.step()
        tr.scheduler.step()
        tr.step += 1
    tr.optimizer.zero_grad(set_to_none=True)
    tr.consumed += t.grad_accum * world.size
    return StepStats(
        loss=loss_sum_v / max(n_sup_v, 1e-12),
        lr=lr,
        supervised_tokens=int(n_tok_v),
        tokens=int(real_v),
        grad_norm=grad_norm_v,
        applied=applied,
        stop=stop_v > 0,
    )


class StopRequests:
    """While active, SIGINT and SIGTERM set ``tr.stop_signal`` instead of interrupting: the
    loop stops between steps. A second signal raises `Stopped` (a KeyboardInterrupt) at once
    (during a save, the checkpoint being written is dropped and the last complete one stays).
    The previous handlers come back on exit. Outside the main thread signals cannot be caught: a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, tr: Trainer) -> None:
        self.tr = tr
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.tr.stop_signal:
            raise Stopped(signum)
        self.tr.stop_signal = signum
        log.warning(
            "%s: stopping after this step and saving it; send it again to stop at once",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _metrics_row(tr: Trainer, s: StepStats, dt: float, eval_loss: float | None) -> MetricRow:
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
        eval_loss=None if eval_loss is None else round(eval_loss, 6),
        mfu=_mfu(tr, dt),
    )


def _mfu(tr: Trainer, dt: float) -> float | None:
    """MFU of the step just taken, from the global micro-batches it consumed (host data: every
    rank has the whole stream); None on the CPU or an unknown GPU."""
    n = tr.cfg.train.grad_accum * tr.world.size
    sixteen = tr.cfg.model.dtype in ("bfloat16", "float16")
    dtype = "bfloat16" if sixteen else compute_dtype(tr.cfg.train.dtype, tr.world.device)
    mbs = (tr.stream[k] for k in range(tr.consumed - n, tr.consumed))
    value = flops.step_mfu(tr.hf_model.config, mbs, dt, tr.world.device, dtype, tr.world.size)
    return None if value is None else round(value, 4)


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
    Under torchrun every rank calls it; metrics and progress come from rank 0. Log lines go
    above the progress bar."""
    with logging_redirect_tqdm():
        return _train(cfg, run_dir, rows=rows, require_resume=require_resume)


def _train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[RehearsalRow] | None = None,
    require_resume: bool = False,
) -> Path:
    t = cfg.train
    reporting.check(t.report_to)
    ckpt_root = RunDir(run_dir).checkpoints
    latest = resumable_checkpoint(ckpt_root)
    if require_resume and latest is None:
        raise InputError(
            "--resume given but there is no checkpoint to resume from", file=str(ckpt_root)
        )
    if latest is not None and read_trainer_state(latest)["step"] >= planned_steps(cfg, latest):
        log.info("training already finished: %s", latest)
        return latest
    tr = setup(cfg, run_dir, rows=rows, resume=latest)
    t = tr.cfg.train  # train.max_steps resolved
    main = tr.world.is_main
    reporters = reporting.Reporters(cfg, run_dir) if main else None
    metrics_path = RunDir(run_dir).metrics
    if main:
        _truncate_metrics(metrics_path, tr.step)
    saved, final = tr.step, None
    bar = tqdm(
        total=t.max_steps,
        initial=tr.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        **({} if main else {"disable": True}),  # TQDM_DISABLE still works on rank 0
    )
    with open(metrics_path, "a") if main else nullcontext() as mf, StopRequests(tr):
        try:
            while tr.step < t.max_steps:
                t0 = time.perf_counter()
                s = train_step(tr)
                dt = time.perf_counter() - t0
                # Validation (collective) only after an applied step: the weights changed.
                eval_loss = validation.at_step(tr) if s.applied else None
                if not s.applied:
                    _nonfinite(tr, s)
                elif main:
                    row = _metrics_row(tr, s, dt, eval_loss)
                    mf.write(json.dumps(row.to_json()) + "\n")
                    mf.flush()
                    reporters.log(row)
                if s.applied:
                    bar.update(1)
                    bar.set_postfix(loss=f"{s.loss:.4f}", tok_s=f"{s.tokens / dt:.0f}")
                if s.applied and (
                    tr.step == t.max_steps or (t.save_every and tr.step % t.save_every == 0)
                ):
                    final, saved = tr.save(final_loss=s.loss), tr.step
                if validation.keep_best(tr, eval_loss, final):
                    saved = tr.step
                # One process needs no agreement: a signal during this step stops after it.
                if s.stop or (tr.stop_signal and tr.world.size == 1):
                    if tr.step > saved:
                        log.warning("interrupted: saving step %d so a rerun resumes here", tr.step)
                        tr.save(interrupted=True)
                    raise Stopped(tr.stop_signal or signal.SIGINT)  # another rank's signal: 0 here
        finally:
            bar.close()
            if reporters is not None:
                reporters.close()
    assert final is not None
    return final


def _nonfinite(tr: Trainer, s: StepStats) -> None:
    """A skipped step: warn, or raise once train.skip_nonfinite_steps are used up."""
    limit = tr.cfg.train.skip_nonfinite_steps
    what = f"step {tr.step + 1}: loss {s.loss} and gradient norm {s.grad_norm} are not both finite"
    tr.skipped += 1
    if tr.skipped > limit:
        last = resumable_checkpoint(tr.ckpt_root)
        raise InputError(
            f"{what}; training stopped, nothing saved"
            + (f" (the last checkpoint, {last.name}, stays resumable)" if last else "")
            + f"; {tr.skipped - 1} of train.skip_nonfinite_steps={limit} skipped before: lower "
            "train.lr or raise train.skip_nonfinite_steps"
        )
    log.warning(
        "%s; skipped without changing weights or optimizer state (%d of "
        "train.skip_nonfinite_steps=%d)",
        what,
        tr.skipped,
        limit,
    )
