"""Triton kernels of the fused masked linear cross-entropy (see cross_entropy.py for the API).

Design (after Apple's cut-cross-entropy, arXiv 2411.09009, written anew):
- Compaction without a host sync: a stable sort puts the supervised rows first and their count
  stays on the device. The grid is sized by N (known on the host); a program whose row block
  starts past the count returns at once, so ignored tokens cost no FLOPs.
- Forward: each program owns BLOCK_N compacted rows and one slice of the vocabulary, computes
  logit tiles hidden @ weight.T in fp32 and keeps an online log-sum-exp (max, sum of exp) and
  the target logit; slices are merged by a tiny torch logsumexp over [splits, N]. Splitting the
  vocabulary keeps the GPU busy when few rows are supervised.
- Backward: one program per (row block, vocabulary tile) recomputes its logit tile, forms
  scale * (softmax - onehot) and adds its products with weight and hidden into fp32 grad
  buffers with atomics. No [N, V] buffer exists in either pass.
- Offsets are int64 (row * stride overflows int32 at N·H or V·H >= 2^31).
- bf16/fp16 tiles feed tl.dot natively on GPU (fp32 accumulate); fp32 inputs use IEEE fp32 dot
  unless torch allows TF32 matmuls. Under TRITON_INTERPRET=1 every tile is upcast to fp32
  before arithmetic: the interpreter mishandles raw bf16.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _lce_forward_kernel(
    H, W, ROWS, Y, COUNT, LSE_OUT, TGT_OUT,
    N, V, D, V_PER_SPLIT,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(COUNT)
    if pid_n * BLOCK_N >= count:
        return  # an all-ignored row block: no FLOPs
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < count
    rows = tl.load(ROWS + offs, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_N,) original rows
    y = tl.load(Y + offs, mask=row_ok, other=-1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(logit - m)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)  # logits tile
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            h = tl.load(
                H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )  # (BLOCK_N, BLOCK_D)  # fmt: skip
            w = tl.load(
                W + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
                mask=col_ok[None, :] & d_ok[:, None], other=0.0,
            )  # (BLOCK_D, BLOCK_V)  # fmt: skip
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * N + offs
    tl.store(LSE_OUT + out, m + tl.log(s), mask=row_ok)
    tl.store(TGT_OUT + out, tgt, mask=row_ok)


@triton.jit
def _lce_backward_kernel(
    H, W, ROWS, Y, COUNT, LSE, SCALE, GH, GW,
    V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    count = tl.load(COUNT)
    if pid_n * BLOCK_N >= count:
        return
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < count
    rows = tl.load(ROWS + offs, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(Y + offs, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(LSE + offs, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + offs, mask=row_ok, other=0.0)  # grad_out * token weight, 0 if masked
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)

    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)  # recomputed logits tile
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        h = tl.load(
            H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        w = tl.load(
            W + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )  # fmt: skip
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    p = tl.exp(acc - lse[:, None])
    p = tl.where(col_ok[None, :], p, 0.0)
    g = (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)) * scale[:, None]  # d loss/d logits
    if not UPCAST:
        g = g.to(W.dtype.element_ty)  # tensor-core dot in the input dtype, fp32 accumulate

    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        if COMPUTE_DH:
            w_t = tl.load(
                W + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0,
            )  # (BLOCK_V, BLOCK_D)  # fmt: skip
            if UPCAST:
                w_t = w_t.to(tl.float32)
            dh = tl.dot(g, w_t, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
            tl.atomic_add(
                GH + rows[:, None] * D + dd[None, :], dh,
                mask=row_ok[:, None] & d_ok[None, :], sem="relaxed",
            )  # fmt: skip
        if COMPUTE_DW:
            h_t = tl.load(
                H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )  # (BLOCK_N, BLOCK_D)  # fmt: skip
            if UPCAST:
                h_t = h_t.to(tl.float32)
            dw = tl.dot(tl.trans(g), h_t, input_precision=PRECISION)  # (BLOCK_V, BLOCK_D)
            tl.atomic_add(
                GW + cols[:, None] * D + dd[None, :], dw,
                mask=col_ok[:, None] & d_ok[None, :], sem="relaxed",
            )  # fmt: skip


# ------------------------------------------------------------------------------- launchers
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes. GPU values are untuned defaults (this project has no GPU to tune on)."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None  # vocabulary slices of the forward grid; None = heuristic


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(x, 1))))


def default_config(n: int, vocab: int, dim: int, dtype: torch.dtype) -> KernelConfig:
    if INTERPRET:
        # The interpreter's cost grows with programs x ops: few, large tiles.
        return KernelConfig(_pow2(n, 16, 64), _pow2(vocab, 16, 4096), _pow2(dim, 16, 256))
    block_d = 32 if dtype == torch.float32 else 64
    return KernelConfig(128, 128, block_d, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    if INTERPRET or dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # ignored for fp16/bf16 tiles
    return "tf32"


def _num_splits(cfg: KernelConfig, n: int, vocab: int, device: torch.device) -> int:
    v_blocks = triton.cdiv(vocab, cfg.block_v)
    if cfg.splits is not None:
        return max(1, min(cfg.splits, v_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # N is an upper bound on the supervised rows (their count stays on the device).
    return max(1, min(v_blocks, triton.cdiv(2 * sms, triton.cdiv(n, cfg.block_n))))


def _check_launch(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> None:
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert rows.shape == (hidden.shape[0],) and rows.is_contiguous()
    assert hidden.dtype == weight.dtype and hidden.device == weight.device


# The launchers are registered as torch custom ops: torch.compile then keeps them opaque (one
# node each, shapes from the fake implementations below) instead of tracing into Triton's
# launcher, which also works when the kernels run in the interpreter.
@torch.library.custom_op("ssrengine::lce_forward", mutates_args=())
def lce_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    rows: torch.Tensor,  # (N,) int64, supervised rows first
    y: torch.Tensor,  # (N,) labels in `rows` order
    count: torch.Tensor,  # () supervised rows, on the device
    block_n: int,
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
    splits: int,  # 0: heuristic
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per compacted row: log-sum-exp of the logits and the target logit, (N,) fp32 each
    (meaningless past `count`)."""
    _check_launch(hidden, weight, rows)
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = KernelConfig(block_n, block_v, block_d, num_warps, num_stages, splits or None)
    splits = _num_splits(cfg, n, vocab, hidden.device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, block_v), splits) * block_v
    splits = triton.cdiv(vocab, v_per_split)  # every slice holds at least one column
    lse = torch.zeros(splits * n, dtype=torch.float32, device=hidden.device)
    tgt = torch.zeros(splits * n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        grid = (triton.cdiv(n, block_n), splits)
        with _on(hidden.device):
            _lce_forward_kernel[grid](
                hidden, weight, rows, y, count, lse, tgt,
                n, vocab, dim, v_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
                num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    if splits == 1:
        return lse, tgt
    return torch.logsumexp(lse.view(splits, n), dim=0), tgt.view(splits, n).sum(dim=0)


@lce_forward.register_fake
def _(hidden, weight, rows, y, count, block_n, block_v, block_d, num_warps, num_stages, splits):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("ssrengine::lce_backward", mutates_args=())
def lce_backward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    rows: torch.Tensor,  # (N,)
    y: torch.Tensor,  # (N,)
    count: torch.Tensor,  # ()
    lse: torch.Tensor,  # (N,) fp32, compacted order
    scale: torch.Tensor,  # (N,) fp32, compacted order: d loss / d (per-row loss)
    need_h: bool,
    need_w: bool,
    block_n: int,
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 grad_hidden (N, H) and grad_weight (V, H), zero rows where ignored; a gradient that
    is not needed comes back empty."""
    _check_launch(hidden, weight, rows)
    assert lse.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32
    n, dim = hidden.shape
    vocab = weight.shape[0]
    gh = hidden.new_zeros((n, dim) if need_h else (0,), dtype=torch.float32)
    gw = weight.new_zeros((vocab, dim) if need_w else (0,), dtype=torch.float32)
    if n > 0 and (need_h or need_w):
        grid = (triton.cdiv(n, block_n), triton.cdiv(vocab, block_v))
        with _on(hidden.device):
            _lce_backward_kernel[grid](
                hidden, weight, rows, y, count, lse, scale,
                gh if need_h else lse, gw if need_w else lse,  # dummies, never touched
                vocab, dim,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
                COMPUTE_DH=need_h, COMPUTE_DW=need_w,
                num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return gh, gw


@lce_backward.register_fake
def _(hidden, weight, rows, y, count, lse, scale, need_h, need_w, *blocks):
    n, dim = hidden.shape
    gh = hidden.new_empty((n, dim) if need_h else (0,), dtype=torch.float32)
    gw = weight.new_empty((weight.shape[0], dim) if need_w else (0,), dtype=torch.float32)
    return gh, gw


def _blocks(cfg: KernelConfig) -> tuple[int, int, int, int, int]:
    return cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages


# ------------------------------------------------------------------------------- autograd
class _TritonLinearCrossEntropy(torch.autograd.Function):
    """Weighted loss sum (per_token=False) or per-token losses (N,), fp32; no host sync."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        token_weights: torch.Tensor | None,
        ignore_index: int,
        per_token: bool,
        cfg: KernelConfig | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        cfg = cfg or default_config(n, weight.shape[0], hidden.shape[1], hidden.dtype)
        valid = labels != ignore_index
        rows = torch.argsort((~valid).to(torch.int8), stable=True)  # supervised rows first
        count = valid.sum()  # stays on the device
        y = labels[rows]
        lse, tgt = lce_forward(hidden, weight, rows, y, count, *_blocks(cfg), cfg.splits or 0)
        in_count = torch.arange(n, device=hidden.device) < count
        w = None if token_weights is None else token_weights[rows].float()
        loss = lse - tgt if w is None else (lse - tgt) * w
        loss = torch.where(in_count, loss, 0.0)  # (N,) compacted order
        ctx.save_for_backward(hidden, weight, rows, y, count, lse, w)
        ctx.per_token, ctx.cfg = per_token, cfg
        if per_token:
            return torch.empty_like(loss).index_copy_(0, rows, loss)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, rows, y, count, lse, w = ctx.saved_tensors
        g = grad_out.float()
        scale = g[rows] if ctx.per_token else g.expand(hidden.shape[0])
        scale = (scale if w is None else scale * w).contiguous()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh, gw = lce_backward(
            hidden, weight, rows, y, count, lse, scale, need_h, need_w, *_blocks(ctx.cfg)
        )
        gh = gh.to(hidden.dtype) if need_h else None
        gw = gw.to(weight.dtype) if need_w else None
        return gh, gw, None, None, None, None, None


def _on(device: torch.device):
    """Launch on the tensors' GPU, not the current one."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    per_token: bool = False,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """Triton path (no argument checks): the weighted loss sum, or per-token losses (N,)."""
    return _TritonLinearCrossEntropy.apply(
        hidden, weight, labels, token_weights, ignore_index, per_token, cfg
    )
