"""The train stage: rehearsal.jsonl → checkpoints/step-N and metrics.jsonl.

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
    if not isinstance(_unwrap(model), CausalLMLoss):
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


def _unwrap(model: Any) -> Any:
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def build_model(cfg: Config, world: distributed.World) -> tuple[Any, Any, nn.Module]:
    """(transformers model, peft model or None, the trainable module: wrapped CausalLMLoss)."""
    t = cfg.train
    fsdp = world.size > 1 and t.parallel == "fsdp"
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
    model.train()
    net = distributed.wrap(
        CausalLMLoss(model, t.loss_impl),
        world,
        t.parallel,
        layers=distributed.decoder_layers(model) if fsdp else [],
        param_dtype=torch.bfloat16 if fsdp and compute == "bfloat16" else None,
    )
    return model, peft_model, net


def train(
    cfg: Config,
    run_dir: Path,
    *,
    rows: list[dict[str, Any]] | None = None,
    require_resume: bool = False,
) -> Path:
    """Train on ``rows`` (default: run_dir/rehearsal.jsonl); returns the final checkpoint dir.

    Resumes from the newest complete checkpoint in run_dir/checkpoints; a finished run is a no-op.
    Under torchrun every rank calls it; metrics and progress come from rank 0."""
    t = cfg.train
    world = distributed.init(cfg.model.device)
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

    torch.manual_seed(t.seed)  # the same on every rank: FSDP2 does not broadcast new weights
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
    model, peft_model, net = build_model(cfg, world)
    device = world.device
    encoded = encode_rows(rows, tokenizer, cfg.data, file=str(run_dir / "rehearsal.jsonl"))
    stream = MicroBatchStream(encoded, cfg, tokenizer.pad_token_id)

    params = [p for p in net.parameters() if p.requires_grad]
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
    start, consumed = 0, 0
    if latest is not None:
        state = load_trainer_state(latest, model=net, optimizer=opt, scheduler=sched)
        start = state["step"]
        consumed = state.get("micro_batches", start * t.grad_accum)
        log.info("resuming from %s (step %d, %d ranks)", latest, start, world.size)
    metrics_path = run_dir / METRICS
    if world.is_main:
        # Drop metric rows past the checkpoint we resume from: they will be recomputed.
        old = (
            [r for r in read_rows(metrics_path) if r["step"] <= start]
            if metrics_path.exists()
            else []
        )
        atomic_write_jsonl(metrics_path, old)

    # FSDP2 with bf16 computes in bf16 through its mixed-precision policy instead.
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if compute_dtype(t.dtype, device) == "bfloat16"
        and not (world.size > 1 and t.parallel == "fsdp")
        else nullcontext()
    )
    ckpt = {
        "model": net,
        "hf_model": model,
        "peft_model": peft_model,
        "tokenizer": tokenizer,
        "optimizer": opt,
        "scheduler": sched,
        "cfg": cfg,
        "keep": t.keep_checkpoints,
    }
    bar = tqdm(
        total=t.max_steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        **({} if world.is_main else {"disable": True}),  # TQDM_DISABLE still works on rank 0
    )
    step, final = start, None
    with open(metrics_path, "a") if world.is_main else nullcontext() as mf:
        try:
            while step < t.max_steps:
                t0 = time.perf_counter()
                mbs = rank_micro_batches(stream, consumed, t.grad_accum, world)
                total, n_sup = accumulate(
                    net, mbs, impl=t.loss_impl, autocast=autocast, world_size=world.size
                )
                clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                consumed += t.grad_accum * world.size
                real = distributed.all_sum(
                    torch.tensor(float(sum(mb.real_tokens for mb in mbs)), device=device)
                )
                # One host sync per step, for logging.
                stats = torch.stack(
                    [total, n_sup.float(), real, distributed.full_value(grad_norm).float()]
                )
                loss_sum_v, n_sup_v, real_v, grad_norm_v = stats.tolist()
                loss_val = loss_sum_v / max(n_sup_v, 1)
                dt = time.perf_counter() - t0
                if world.is_main:
                    row = {
                        "step": step,
                        "loss": round(loss_val, 6),
                        "lr": lr,
                        "supervised_tokens": int(n_sup_v),
                        "tokens": int(real_v),
                        "tokens_per_s": round(real_v / dt, 2),
                        "grad_norm": round(grad_norm_v, 6),
                        "step_time_s": round(dt, 4),
                        "epoch": (consumed - 1) // stream.per_epoch,
                        "world_size": world.size,
                    }
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{real_v / dt:.0f}")
                if step == t.max_steps or (t.save_every and step % t.save_every == 0):
                    final = save_checkpoint(
                        ckpt_root,
                        step,
                        extra={"final_loss": loss_val, "micro_batches": consumed},
                        **ckpt,
                    )
        except KeyboardInterrupt:
            # Ranks are interrupted at different points; a collective save could hang.
            if step > start and world.size == 1:
                log.warning("interrupted: saving step %d so a rerun resumes here", step)
                save_checkpoint(
                    ckpt_root,
                    step,
                    extra={"interrupted": True, "micro_batches": consumed},
                    **ckpt,
                )
            raise
        finally:
            bar.close()
    assert final is not None
    return final
