"""The train stage: rehearsal.jsonl → checkpoints/step-N and metrics.jsonl.

Loss normalization (torchtitan/torchtune): count the supervised tokens of the whole optimizer
step first, sum-reduce each micro-batch's loss and divide by that count — never average
micro-batch means (the 2024 gradient-accumulation bug).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssrengine import IGNORE_INDEX
from ssrengine.batching import MicroBatch, encode_rows, micro_batches
from ssrengine.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from ssrengine.config import Config
from ssrengine.errors import InputError
from ssrengine.io import atomic_write_jsonl, read_rows
from ssrengine.models import hidden_and_head, load_model, load_tokenizer

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


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

    return fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum", impl=impl
    )


def accumulate(
    model: Any, mbs: list[MicroBatch], *, impl: str = "auto", autocast: Any = None
) -> tuple[torch.Tensor, int]:
    """Backward over one optimizer step's micro-batches; returns (summed loss, supervised tokens).

    The supervised-token count of the whole step is known before the first backward, so every
    micro-batch's summed loss is divided by the same global count."""
    device = next(model.parameters()).device
    n_sup = sum(mb.supervised_tokens for mb in mbs)
    total = torch.zeros((), device=device)
    for mb in mbs:
        with autocast or nullcontext():
            loss = loss_sum(model, _to(mb, device), impl)
        (loss / max(n_sup, 1)).backward()
        total += loss.detach()
    return total, n_sup


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


def _to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.model_kwargs.items()}
    return MicroBatch(
        mb.input_ids.to(device),
        mb.labels.to(device),
        kw,
        mb.supervised_tokens,
        mb.real_tokens,
        mb.ids,
    )


def train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[dict[str, Any]] | None = None,
    require_resume: bool = False,
) -> Path:
    """Train on ``rows`` (default: run_dir/rehearsal.jsonl); returns the final checkpoint dir.

    Resumes from the newest complete checkpoint in run_dir/checkpoints; a finished run is a no-op."""
    t = cfg.train
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if require_resume and latest is None:
        raise InputError(
            "--resume given but there is no checkpoint to resume from", file=str(ckpt_root)
        )
    if (
        latest is not None
        and json.loads((latest / "trainer_state.json").read_text())["step"] >= t.max_steps
    ):
        log.info("training already finished: %s", latest)
        return latest
    if t.packing and t.max_tokens < cfg.data.max_seq_len:
        raise InputError(
            f"train.max_tokens={t.max_tokens} is smaller than data.max_seq_len={cfg.data.max_seq_len}",
            field="train.max_tokens",
        )

    torch.manual_seed(t.seed)
    if rows is None:
        rows = (
            read_rows(run_dir / "rehearsal.jsonl")
            if (run_dir / "rehearsal.jsonl").exists()
            else None
        )
        if rows is None:
            raise InputError(
                "missing; run the build stage first", file=str(run_dir / "rehearsal.jsonl")
            )
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    device = next(model.parameters()).device
    encoded = encode_rows(rows, tokenizer, cfg.data, file=str(run_dir / "rehearsal.jsonl"))
    stream = MicroBatchStream(encoded, cfg, tokenizer.pad_token_id)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        foreach=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    if latest is not None:
        state = load_trainer_state(latest, model=model, optimizer=opt, scheduler=sched)
        start = state["step"]
        log.info("resuming from %s (step %d)", latest, start)
    metrics_path = run_dir / METRICS
    # Drop metric rows past the checkpoint we resume from: they will be recomputed identically.
    old = (
        [r for r in read_rows(metrics_path) if r["step"] <= start] if metrics_path.exists() else []
    )
    atomic_write_jsonl(metrics_path, old)

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.dtype == "bfloat16"
        else nullcontext()
    )
    bar = tqdm(total=t.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step, final = start, None
    with open(metrics_path, "a") as mf:
        try:
            while step < t.max_steps:
                t0 = time.perf_counter()
                mbs = [stream[step * t.grad_accum + i] for i in range(t.grad_accum)]
                total, n_sup = accumulate(model, mbs, impl=t.loss_impl, autocast=autocast)
                clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                # One host sync per step, for logging.
                loss_val = total.item() / max(n_sup, 1)
                dt = time.perf_counter() - t0
                real = sum(mb.real_tokens for mb in mbs)
                row = {
                    "step": step,
                    "loss": round(loss_val, 6),
                    "lr": lr,
                    "supervised_tokens": n_sup,
                    "tokens": real,
                    "tokens_per_s": round(real / dt, 2),
                    "grad_norm": round(float(grad_norm), 6),
                    "step_time_s": round(dt, 4),
                    "epoch": (step * t.grad_accum - 1) // stream.per_epoch,
                }
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{real / dt:.0f}")
                if step == t.max_steps or (t.save_every and step % t.save_every == 0):
                    final = save_checkpoint(
                        ckpt_root,
                        step,
                        model=model,
                        tokenizer=tokenizer,
                        optimizer=opt,
                        scheduler=sched,
                        cfg=cfg,
                        extra={"final_loss": loss_val},
                        keep=t.keep_checkpoints,
                    )
        except KeyboardInterrupt:
            if step > start:
                log.warning("interrupted: saving step %d so a rerun resumes here", step)
                save_checkpoint(
                    ckpt_root,
                    step,
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=opt,
                    scheduler=sched,
                    cfg=cfg,
                    extra={"interrupted": True},
                    keep=t.keep_checkpoints,
                )
            raise
        finally:
            bar.close()
    assert final is not None
    return final
