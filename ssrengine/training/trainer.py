"""The train stage: rehearsal.jsonl → checkpoints/step-N and metrics.jsonl.

Three pieces, as in torchtitan: `setup` builds model, optimizer, schedule and data stream from
the config (restoring a checkpoint through `ssrengine.training.checkpoint`); `train_step` is one
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

The pieces: `loss` (the step's loss and backward), `net` (the trainable module),
`state` (`Trainer`, the micro-batch stream, `StepStats`), `validation`, `checkpoint`.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError, Stopped
from ssrengine.core.io import atomic_write_jsonl, json_text, open_append
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import MetricRow, RehearsalRow, RunDir
from ssrengine.models import flops
from ssrengine.models.attention import compute_dtype
from ssrengine.models.fetch import resolve_once
from ssrengine.models.loading import load_tokenizer
from ssrengine.training import distributed, reporting, validation
from ssrengine.training.batching import encode_rows
from ssrengine.training.callbacks import Callbacks, ProgressLog, api_callbacks, load_callbacks
from ssrengine.training.checkpoint import (
    load_trainer_state,
    read_trainer_state,
    resumable_checkpoint,
)
from ssrengine.training.divergence import DivergenceGuard
from ssrengine.training.loss import accumulate, to_device
from ssrengine.training.net import bf16_dtypes, build_model, grad_scaler
from ssrengine.training.optim import build_optimizer, planned_steps, resolve_steps, sync_lr
from ssrengine.training.state import MicroBatchStream, StepStats, Trainer, rank_micro_batches

log = logging.getLogger(__name__)


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
    encoded = encode_rows(rows, tokenizer, cfg.data, file=str(rd.rehearsal), train=cfg.train)
    stream = MicroBatchStream(encoded, cfg, tokenizer.pad_token_id)
    cfg = resolve_steps(cfg, stream.per_epoch, world.size)
    opt, sched = build_optimizer(cfg.train, net, world.device, cfg.train.max_steps)
    autocast = bf16_dtypes(cfg, world)[1]
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
        autocast=autocast,
        scaler=grad_scaler(autocast, world.device),
        eval_batches=[
            to_device(mb, world.device) for mb in validation.batches(cfg, eval_rows, tokenizer)
        ],
    )
    if resume is not None:
        state = load_trainer_state(resume, model=net, optimizer=opt, scheduler=sched)
        tr.step = state["step"]
        tr.consumed = state.get("micro_batches", tr.step * cfg.train.grad_accum)
        tr.skipped = state.get("nonfinite_skipped", 0)
        if tr.scaler is not None and "grad_scaler" in state:
            tr.scaler.load_state_dict(state["grad_scaler"])
        sync_lr(sched)  # this run's schedule: an extended run's differs from the checkpoint's
        ranks = f"{world.size} rank" + ("s" if world.size != 1 else "")
        log.info("resuming from %s (step %d, %s)", resume, tr.step, ranks)
    return tr


def train_step(tr: Trainer) -> StepStats:
    """One optimizer step: this rank's micro-batches, accumulate, clip, step, advance.

    The data position always advances; the optimizer step, the schedule and ``tr.step`` only
    when loss and gradient norm are finite (``applied``)."""
    t, world = tr.cfg.train, tr.world
    mbs = rank_micro_batches(tr.stream, tr.consumed, t.grad_accum, world)
    autocast = torch.autocast(world.device.type, dtype=tr.autocast) if tr.autocast else None
    for attempt in range(MAX_RESCALES + 1):
        total, n_sup = accumulate(
            tr.net, mbs, impl=t.loss_impl, autocast=autocast, world_size=world.size,
            scaler=tr.scaler,
        )  # fmt: skip
        if tr.scaler is not None:
            tr.scaler.unscale_(tr.optimizer)  # clip and step see the true gradients
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
        # The one host sync per step, before the optimizer step: it decides whether to apply
        # it. The loss is per unit of weight (per supervised token when unweighted).
        stats = torch.cat(
            [torch.stack([total, n_sup.float(), distributed.full_value(grad_norm).float()]), summed]
        )
        loss_sum_v, n_sup_v, grad_norm_v, real_v, n_tok_v, stop_v = stats.tolist()
        applied = math.isfinite(loss_sum_v) and math.isfinite(grad_norm_v)
        if not _rescaled(tr, loss_sum_v, applied, attempt):
            break
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


# fp16 overflows a step recomputes at a halved loss scale before it counts as non-finite:
# from GradScaler's initial 2^16, 24 halvings reach 2^-8.
MAX_RESCALES = 24


def _rescaled(tr: Trainer, loss: float, applied: bool, attempt: int) -> bool:
    """train.dtype = float16: update the loss scale (halved after an overflow); True when the
    gradients overflowed at a finite loss, so the same micro-batches run again at the lower
    scale (the first steps find the scale this way) instead of counting as non-finite."""
    if tr.scaler is None:
        return False
    tr.scaler.update()
    if applied or not math.isfinite(loss) or attempt >= MAX_RESCALES:
        return False
    log.debug("fp16 gradients overflowed: loss scale now %g", tr.scaler.get_scale())
    tr.optimizer.zero_grad(set_to_none=True)
    return True


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


@resolve_once()
def train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[RehearsalRow] | None = None,
    require_resume: bool = False,
    on_start: Callable[[], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train on ``rows`` (default: run_dir/rehearsal.jsonl); returns the final checkpoint dir.
    ``callbacks`` (`ssrengine.training.callbacks`) run on rank 0 after train.callbacks'.

    Resumes from the newest complete checkpoint in run_dir/checkpoints; a finished run is a no-op.
    Under torchrun every rank calls it; metrics and progress come from rank 0. Log lines go
    above the progress bar. ``on_start`` runs once every refusal (damaged checkpoints, the data)
    has passed, before the first write to run_dir."""
    with logging_redirect_tqdm():
        return _train(
            cfg,
            run_dir,
            rows=rows,
            require_resume=require_resume,
            on_start=on_start,
            callbacks=callbacks,
        )


def _train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[RehearsalRow] | None = None,
    require_resume: bool = False,
    on_start: Callable[[], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    t = cfg.train
    reporting.check(t.report_to)
    # train.callbacks first (a bad spec stops here), then the Python API's and the caller's
    user_callbacks = [*load_callbacks(t.callbacks), *api_callbacks(), *callbacks]
    ckpt_root = RunDir(run_dir).checkpoints
    latest = resumable_checkpoint(ckpt_root)
    if require_resume and latest is None:
        raise InputError(
            "--resume given but there is no checkpoint to resume from", file=str(ckpt_root)
        )
    done = read_trainer_state(latest)["step"] if latest is not None else 0
    planned = planned_steps(cfg, latest) if latest is not None else None
    if latest is not None and planned is not None and done >= planned:
        return _finished(latest, done, planned)
    tr = setup(cfg, run_dir, rows=rows, resume=latest)
    if latest is not None and done >= tr.cfg.train.max_steps:  # train.epochs, resolved
        return _finished(latest, done, tr.cfg.train.max_steps)
    if on_start is not None:
        on_start()
    t = tr.cfg.train  # train.max_steps resolved
    main = tr.world.is_main
    reporters = reporting.Reporters(cfg, run_dir, start_step=tr.step) if main else None
    # Piped or redirected stderr: no \r progress bar, a plain log line every few steps.
    tty = sys.stderr.isatty()
    plain = [] if tty else [ProgressLog(t.max_steps, t.log_every)]
    cbs = Callbacks([reporters, *plain, *user_callbacks]) if main else None
    if cbs is not None:
        tr.save = _notify_checkpoint(tr.save, cbs)  # every save: step-N, interrupted, best
    vocab = tr.hf_model.get_output_embeddings().weight.shape[0]
    guard = DivergenceGuard(vocab, t.divergence_factor)
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
        **({} if main and tty else {"disable": True}),  # TQDM_DISABLE still works on rank 0
    )
    with open_append(metrics_path) if main else nullcontext() as mf, StopRequests(tr):
        try:
            while tr.step < t.max_steps:
                t0 = time.perf_counter()
                s = train_step(tr)
                dt = time.perf_counter() - t0
                # Validation (collective) only after an applied step: the weights changed.
                eval_loss = validation.at_step(tr) if s.applied else None
                if not s.applied:
                    _nonfinite(tr, s)
                elif (why := guard.check(s.loss)) is not None:
                    _diverged(tr, why)
                elif main:
                    row = _metrics_row(tr, s, dt, eval_loss)
                    mf.write(json_text(row.to_json()) + "\n")
                    mf.flush()
                    cbs.on_step_end(row)
                    if eval_loss is not None:
                        cbs.on_evaluate(tr.step, {"eval_loss": eval_loss})
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
            if cbs is not None:
                cbs.on_train_end(final if tr.step >= t.max_steps else None)
    assert final is not None
    return final


def _notify_checkpoint(save: Callable[..., Path], cbs: Callbacks) -> Callable[..., Path]:
    """``Trainer.save`` that tells the callbacks about each complete checkpoint."""

    def notifying(**extra: Any) -> Path:
        path = save(**extra)
        cbs.on_checkpoint(path)
        return path

    return notifying


def _finished(latest: Path, done: int, planned: int) -> Path:
    """A run that reached its length: a no-op; one longer than asked for: one line (an
    extension, a longer train.max_steps or train.epochs, resumes instead)."""
    if done > planned:
        raise InputError(
            f"the checkpoints already reach step {done}, past the {planned} steps asked for: "
            f"use an earlier checkpoint from {latest.parent}, or train into a new run.dir",
            field="train.max_steps / train.epochs",
        )
    log.info("training already finished: %s", latest)
    return latest


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


def _diverged(tr: Trainer, why: str) -> None:
    """Stop before this step is recorded or checkpointed (every rank saw the same loss). The
    loss was measured before this step's update: with the weights of step ``tr.step - 1``."""
    last = resumable_checkpoint(tr.ckpt_root)
    where = ""
    if last is not None:
        step = read_trainer_state(last)["step"]
        where = (
            f" (the last checkpoint, {last.name}, holds the weights that gave this loss)"
            if step == tr.step - 1
            else f" (the last checkpoint, {last.name}, stays resumable)"
        )
    raise InputError(
        f"step {tr.step}: training diverged: {why}; stopped, nothing saved{where}: lower "
        "train.lr (or raise train.divergence_factor; 0 = off)"
    )
