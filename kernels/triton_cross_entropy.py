"""Triton kernels of the fused masked linear cross-entropy (see cross_entropy.py for the API).

Design (after Apple's cut-cross-entropy, arXiv 2411.09009, written anew):
- Compaction without a host sync: a stable sort puts the supervised rows first and their count
  stays on the device. The grid is sized by N (known on the host); a program whose row block
  starts past the count returns at once, so ignored tokens cost no FLOPs.
- Forward: each program owns BLOCK_N compacted rows and one slice of the vocabulary, computes
  logit tiles hidden @ weight.T (+ bias, softcapped) in fp32 and keeps an online log-sum-exp
  (max, sum of exp), the target logit and, for label smoothing, the sum of the logits; slices
  are merged by a tiny torch logsumexp over [splits, N]. Splitting the vocabulary keeps the GPU
  busy when few rows are supervised.
- Backward: one program per (row block, vocabulary tile) recomputes its logit tile, forms
  coef_p * softmax - coef_y * target distribution (times the softcap's derivative; the
  coefficients carry token weights, z-loss and the lse's own gradient: torch_cross_entropy's
  `logit_coefficients`) and adds its products with weight and hidden, and its column sums for
  the bias, into fp32 grad buffers with atomics. No [N, V] buffer exists in either pass.
- Offsets are int64 (row * stride overflows int32 at N·H or V·H >= 2^31).
- Tiles: each launch on a GPU takes the candidate that, compiled for the device's
  architecture, fits its shared memory without spilling (triton_tiles.py, from the compiled
  table kernels/aot.py writes).
- bf16/fp16 tiles feed tl.dot natively on GPU (fp32 accumulate); fp32 inputs use IEEE fp32 dot
  unless torch allows TF32 matmuls. Under TRITON_INTERPRET=1 every tile is upcast to fp32
  before arithmetic: the interpreter mishandles raw bf16.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources  # noqa: F401 (re-exported for callers)

from . import triton_tiles
from .torch_cross_entropy import logit_coefficients, token_losses, upstream_scale
from .triton_kernels import _lce_backward_kernel, _lce_forward_kernel
from .triton_tiles import KernelConfig, Pass, T

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------- launchers
def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(x, 1))))


def interpreter_config(n: int, vocab: int, dim: int) -> KernelConfig:
    # The interpreter's cost grows with programs x ops: few, large tiles.
    return KernelConfig(_pow2(n, 16, 64), _pow2(vocab, 16, 4096), _pow2(dim, 16, 256))


def default_config(n: int, vocab: int, dim: int, dtype: torch.dtype) -> KernelConfig | None:
    """The interpreter's config, or None on a GPU: each launch then picks its own tiles for the
    device (`triton_tiles.pick_config`)."""
    return interpreter_config(n, vocab, dim) if INTERPRET else None


def tf32_enabled() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _precision(dtype: torch.dtype) -> str:
    if INTERPRET or dtype != torch.float32 or not tf32_enabled():
        return "ieee"  # ignored for fp16/bf16 tiles
    return "tf32"


def _num_splits(cfg: KernelConfig, n: int, vocab: int, device: torch.device) -> int:
    v_blocks = triton.cdiv(vocab, cfg.block_v)
    if cfg.splits is not None:
        return max(1, min(cfg.splits, v_blocks))
    if device.type != "cuda" or n == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # N is an upper bound on the supervised rows (their count stays on the device).
    return max(1, min(v_blocks, triton.cdiv(2 * sms, triton.cdiv(n, cfg.block_n))))


def _check_launch(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> None:
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    assert rows.shape == (hidden.shape[0],) and rows.is_contiguous()
    assert hidden.dtype == weight.dtype and hidden.device == weight.device


def _launch(
    kind: Pass,
    variant: str,
    cfg: KernelConfig | None,
    dtype: torch.dtype,
    device: torch.device,
    run: Callable[[KernelConfig], T],
) -> T:
    tf32 = _precision(dtype) == "tf32"
    return triton_tiles.launch(kind, variant, cfg, dtype, tf32, device, run)


# The launchers are registered as torch custom ops: torch.compile then keeps them opaque (one
# node each, shapes from the fake implementations below) instead of tracing into Triton's
# launcher, which also works when the kernels run in the interpreter. A config with
# block_n == 0 means "pick tiles for the device" (`_launch`).
def _forward_split(cfg: KernelConfig, n: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(slices, columns per slice) of the forward grid; every slice holds at least one column."""
    splits = _num_splits(cfg, n, vocab, device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, cfg.block_v), splits) * cfg.block_v
    return triton.cdiv(vocab, v_per_split), v_per_split


def forward_kernel_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    y: torch.Tensor,
    count: torch.Tensor,
    lse: torch.Tensor,
    tgt: torch.Tensor,
    zsum: torch.Tensor | None,
    v_per_split: int,
    cfg: KernelConfig,
    softcap: float = 0.0,
) -> tuple[tuple, dict]:
    """The forward kernel's positional arguments and keyword options, as launched (the
    ahead-of-time compile builds its signatures from this very function). ``zsum`` None: the
    logits' row sums (label smoothing) are not computed; ``softcap`` 0: no cap."""
    n, dim = hidden.shape
    args = (
        hidden, weight, weight if bias is None else bias, rows, y, count, lse, tgt,
        lse if zsum is None else zsum,  # dummies, never touched
        n, weight.shape[0], dim, v_per_split, float(softcap),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, SUM_LOGITS=zsum is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return args, kwargs


def backward_kernel_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    y: torch.Tensor,
    count: torch.Tensor,
    lse: torch.Tensor,
    coef_p: torch.Tensor,
    coef_y: torch.Tensor,
    gh: torch.Tensor | None,
    gw: torch.Tensor | None,
    gb: torch.Tensor | None,
    cfg: KernelConfig,
    filter_eps: float = 0.0,
    softcap: float = 0.0,
    smoothing: float = 0.0,
) -> tuple[tuple, dict]:
    """The backward kernel's arguments; gh / gw / gb None = that gradient is not computed;
    ``filter_eps`` > 0 skips vocabulary tiles whose softmax stays below it."""
    dim = hidden.shape[1]
    args = (
        hidden, weight, weight if bias is None else bias, rows, y, count, lse, coef_p, coef_y,
        lse if gh is None else gh, lse if gw is None else gw, lse if gb is None else gb,
        weight.shape[0], dim, float(filter_eps), float(softcap), float(smoothing),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
        COMPUTE_DH=gh is not None, COMPUTE_DW=gw is not None, COMPUTE_DB=gb is not None,
        FILTER=filter_eps > 0, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        HAS_SMOOTHING=smoothing > 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return args, kwargs


def _config_or_none(block_n, block_v, block_d, num_warps, num_stages, splits=0):
    if block_n == 0:
        return None
    return KernelConfig(block_n, block_v, block_d, num_warps, num_stages, splits or None)


@torch.library.custom_op("ssrengine::lce_forward", mutates_args=())
def lce_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    rows: torch.Tensor,  # (N,) int64, supervised rows first
    y: torch.Tensor,  # (N,) labels in `rows` order
    count: torch.Tensor,  # () supervised rows, on the device
    softcap: float,  # 0: none
    sum_logits: bool,  # the row sums of the logits too (label smoothing)
    block_n: int,  # 0: tiles picked for the device
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
    splits: int,  # 0: heuristic
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per compacted row: log-sum-exp of the logits, the target logit and (``sum_logits``, else
    empty) the sum of the logits, (N,) fp32 each (meaningless past `count`)."""
    _check_launch(hidden, weight, rows)
    n, vocab = hidden.shape[0], weight.shape[0]
    cfg = _config_or_none(block_n, block_v, block_d, num_warps, num_stages, splits)

    def run(tile: KernelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        nsplit, v_per_split = _forward_split(tile, n, vocab, hidden.device)
        lse, tgt, zsum = (
            torch.zeros(nsplit * n if k else 0, dtype=torch.float32, device=hidden.device)
            for k in (True, True, sum_logits)
        )
        if n > 0:
            args, kwargs = forward_kernel_args(
                hidden, weight, bias, rows, y, count, lse, tgt, zsum if sum_logits else None,
                v_per_split, tile, softcap,
            )  # fmt: skip
            with _on(hidden.device):
                _lce_forward_kernel[(triton.cdiv(n, tile.block_n), nsplit)](*args, **kwargs)
        return lse, tgt, zsum, nsplit

    variant = triton_tiles.variant_of(
        "forward", bias=bias is not None, softcap=softcap > 0, smoothing=sum_logits
    )
    lse, tgt, zsum, nsplit = _launch("forward", variant, cfg, hidden.dtype, hidden.device, run)
    if nsplit == 1:
        return lse, tgt, zsum
    if sum_logits:
        zsum = zsum.view(nsplit, n).sum(dim=0)
    return torch.logsumexp(lse.view(nsplit, n), dim=0), tgt.view(nsplit, n).sum(dim=0), zsum


@lce_forward.register_fake
def _(hidden, weight, bias, rows, y, count, softcap, sum_logits, *blocks):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    zsum = hidden.new_empty(n if sum_logits else 0, **f32)
    return hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), zsum


@torch.library.custom_op("ssrengine::lce_backward", mutates_args=("gw_into",))
def lce_backward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    rows: torch.Tensor,  # (N,)
    y: torch.Tensor,  # (N,)
    count: torch.Tensor,  # ()
    lse: torch.Tensor,  # (N,) fp32, compacted order
    coef_p: torch.Tensor,  # (N,) fp32, compacted order: the softmax's coefficient
    coef_y: torch.Tensor,  # (N,) fp32: the target distribution's (`logit_coefficients`)
    need_h: bool,
    need_w: bool,
    need_b: bool,
    filter_eps: float,  # 0: no gradient filtering
    softcap: float,  # 0: none
    smoothing: float,
    gw_into: torch.Tensor | None,  # (V, H) fp32 contiguous: add grad_weight into it instead
    block_n: int,  # 0: tiles picked for the device
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 grad_hidden (N, H), grad_weight (V, H) and grad_bias (V,), zero rows where ignored;
    a gradient that is not needed, or that went into ``gw_into``, comes back empty."""
    _check_launch(hidden, weight, rows)
    for t in (lse, coef_p, coef_y):
        assert t.is_contiguous() and t.dtype == torch.float32
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config_or_none(block_n, block_v, block_d, num_warps, num_stages)

    def run(tile: KernelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f32 = dict(dtype=torch.float32)
        gh = hidden.new_zeros((n, dim) if need_h else (0,), **f32)
        gb = weight.new_zeros(vocab if need_b else 0, **f32)
        if gw_into is not None:  # the atomics add to what it holds: no zeroed buffer
            assert gw_into.shape == (vocab, dim) and gw_into.is_contiguous()
            assert gw_into.dtype == torch.float32
        gw = (
            gw_into
            if gw_into is not None
            else weight.new_zeros((vocab, dim) if need_w else (0,), **f32)
        )
        if n > 0 and (need_h or need_w or need_b):
            args, kwargs = backward_kernel_args(
                hidden, weight, bias, rows, y, count, lse, coef_p, coef_y,
                gh if need_h else None, gw if need_w else None, gb if need_b else None, tile,
                filter_eps, softcap, smoothing,
            )  # fmt: skip
            grid = (triton.cdiv(n, tile.block_n), triton.cdiv(vocab, tile.block_v))
            with _on(hidden.device):
                _lce_backward_kernel[grid](*args, **kwargs)
        # A custom op may not return an alias of an input.
        gw = weight.new_empty(0, **f32) if gw_into is not None else gw
        return gh, gw, gb

    variant = triton_tiles.variant_of(
        "backward", dh=need_h, dw=need_w, db=need_b, bias=bias is not None, softcap=softcap > 0,
        smoothing=smoothing > 0, filter=filter_eps > 0,
    )  # fmt: skip
    return _launch("backward", variant, cfg, hidden.dtype, hidden.device, run)


@lce_backward.register_fake
def _(hidden, weight, bias, rows, y, count, lse, coef_p, coef_y, need_h, need_w, need_b,
      filter_eps, softcap, smoothing, gw_into, *blocks):  # fmt: skip
    n, dim = hidden.shape
    f32 = dict(dtype=torch.float32)
    gh = hidden.new_empty((n, dim) if need_h else (0,), **f32)
    full = need_w and gw_into is None
    gw = weight.new_empty((weight.shape[0], dim) if full else (0,), **f32)
    return gh, gw, weight.new_empty(weight.shape[0] if need_b else 0, **f32)


def _blocks(cfg: KernelConfig | None) -> tuple[int, int, int, int, int]:
    if cfg is None:
        return 0, 0, 0, 0, 0
    return cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages


# ------------------------------------------------------------------------------- autograd
class _TritonLinearCrossEntropy(torch.autograd.Function):
    """(Weighted loss sum, or per-token losses (N,); per-token lse (N,)), fp32; no host sync."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        token_weights: torch.Tensor | None,
        ignore_index: int,
        per_token: bool,
        cfg: KernelConfig | None,
        filter_eps: float,
        into_grad: bool,
        softcap: float,  # 0: none
        smoothing: float,
        z_loss: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        ctx.leaf = weight if into_grad and _accumulable(weight) else None
        # An fp32 master weight under autocast is cast here (see cross_entropy.py): its
        # gradient then leaves as the fp32 kernel buffer itself, no copies.
        w_dtype, weight = weight.dtype, weight.to(hidden.dtype)
        b_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(hidden.dtype)
        cfg = cfg or default_config(n, vocab, hidden.shape[1], hidden.dtype)
        valid = labels != ignore_index
        rows = torch.argsort((~valid).to(torch.int8), stable=True)  # supervised rows first
        count = valid.sum()  # stays on the device
        y = labels[rows]
        splits = (cfg.splits or 0) if cfg is not None else 0
        lse, tgt, zsum = lce_forward(
            hidden, weight, bias, rows, y, count, softcap, smoothing > 0, *_blocks(cfg), splits
        )
        in_count = torch.arange(n, device=hidden.device) < count
        loss = token_losses(lse, tgt, zsum if smoothing else None, vocab, smoothing, z_loss)
        w = None if token_weights is None else token_weights[rows].float()
        loss = loss if w is None else loss * w
        loss = torch.where(in_count, loss, 0.0)  # (N,) compacted order
        lse_out = torch.empty_like(lse).index_copy_(0, rows, torch.where(in_count, lse, 0.0))
        ctx.save_for_backward(hidden, weight, bias, rows, y, count, lse, w)
        ctx.per_token, ctx.cfg, ctx.w_dtype, ctx.b_dtype = per_token, cfg, w_dtype, b_dtype
        ctx.opts = (filter_eps, softcap, smoothing, z_loss)
        if per_token:
            return torch.empty_like(loss).index_copy_(0, rows, loss), lse_out
        return loss.sum(), lse_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        hidden, weight, bias, rows, y, count, lse, w = ctx.saved_tensors
        filter_eps, softcap, smoothing, z_loss = ctx.opts
        scale = upstream_scale(grad_out, rows, hidden.shape[0], ctx.per_token, w, lse)
        coef_p, coef_y = logit_coefficients(
            scale, lse, z_loss, None if grad_lse is None else grad_lse[rows]
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        into = _grad_buffer(ctx.leaf) if need_w and ctx.leaf is not None else None
        gh, gw, gb = lce_backward(
            hidden, weight, bias, rows, y, count, lse, coef_p.contiguous(), coef_y.contiguous(),
            need_h, need_w, need_b, filter_eps, softcap, smoothing, into, *_blocks(ctx.cfg),
        )  # fmt: skip
        gh = gh.to(hidden.dtype) if need_h else None
        if into is not None:
            # Already added to .grad. Autograd still gets a gradient, so AccumulateGrad runs
            # (and with it DDP's and FSDP2's hooks): a broadcast zero, no (V, H) memory.
            gw = torch.zeros((), dtype=torch.float32, device=weight.device).expand(weight.shape)
        else:
            gw = gw.to(ctx.w_dtype) if need_w else None
        gb = gb.to(ctx.b_dtype) if need_b else None
        return (gh, gw, gb) + (None,) * 10


def _accumulable(weight: torch.Tensor) -> bool:
    """Whether the weight's gradient can be added to its .grad by the kernel: an eager fp32
    leaf (a Parameter, or FSDP2's unsharded one), not a traced, fake or DTensor stand-in."""
    return (
        type(weight) in (torch.Tensor, torch.nn.Parameter)
        and weight.is_leaf
        and weight.requires_grad
        and weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
    )


def _grad_buffer(leaf: torch.Tensor) -> torch.Tensor | None:
    """leaf.grad, created as zeros when absent, if the kernel can add into it; else None."""
    if leaf.grad is None:
        leaf.grad = torch.zeros_like(leaf, memory_format=torch.contiguous_format)
    g = leaf.grad
    ok = type(g) is torch.Tensor and g.is_contiguous() and g.dtype == torch.float32
    return g if ok and g.shape == leaf.shape else None


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
    filter_eps: float = 0.0,
    into_grad: bool = False,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton path (no argument checks): the weighted loss sum, or per-token losses (N,); with
    ``return_lse`` also the per-token log-sum-exp (N,), differentiable, 0 where ignored.
    ``into_grad``: add an fp32 leaf weight's gradient straight into its .grad (see
    `fused_linear_cross_entropy`)."""
    loss, lse = _TritonLinearCrossEntropy.apply(
        hidden, weight, bias, labels, token_weights, ignore_index, per_token, cfg, filter_eps,
        into_grad, float(softcap or 0.0), float(label_smoothing), float(z_loss),
    )  # fmt: skip
    return (loss, lse) if return_lse else loss
