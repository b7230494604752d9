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
- Tiles: on a GPU each pass picks its tile sizes and pipeline depth from the device's shared
  memory per block (`pick_config`, `_launch`), since one fixed choice cannot fit A100 (163 KiB),
  A10/L4 (99 KiB) and H100 (227 KiB) alike; kernels/aot.py compiles the choices for each.
- bf16/fp16 tiles feed tl.dot natively on GPU (fp32 accumulate); fp32 inputs use IEEE fp32 dot
  unless torch allows TF32 matmuls. Under TRITON_INTERPRET=1 every tile is upcast to fp32
  before arithmetic: the interpreter mishandles raw bf16.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

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
    V, D, FILTER_EPS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, FILTER: tl.constexpr,
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
    d = p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)  # softmax - onehot
    if FILTER:  # noqa: SIM102 (a constexpr branch: compiled out when off)
        # Gradient filtering (cut-cross-entropy, arXiv 2411.09009, section 4.3): a tile whose
        # every |softmax - onehot| is below FILTER_EPS (the compute dtype's eps / 32) changes
        # no gradient entry by more than the 16-bit rounding of its neighbours: skip both
        # products. No target lies in such a tile (its entry is p - 1).
        if tl.max(tl.where(row_ok[:, None], tl.abs(d), 0.0)) < FILTER_EPS:
            return
    g = d * scale[:, None]  # d loss / d logits
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
    """Tile sizes and pipeline depth of one kernel launch."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None  # vocabulary slices of the forward grid; None = heuristic


# Shared memory one block may opt into, by compute capability (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): what the launcher plans for when it
# cannot ask the device, and what the ahead-of-time compile test checks against.
SHARED_MEMORY_BY_ARCH = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}

# Candidate tiles, best first (untuned: this project has no GPU to tune on). The launcher takes
# the first whose estimated shared memory fits the device; if the compiled kernel still does
# not fit, the launch falls back to the next one (see `_launch`).
_TILES_16BIT = (
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=2),
    KernelConfig(64, 128, 64, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 32, num_warps=4, num_stages=1),
    KernelConfig(32, 32, 32, num_warps=4, num_stages=1),
)
_TILES_FP32 = (
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(128, 64, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 16, num_warps=4, num_stages=2),
    KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
)

Pass = Literal["forward", "backward"]
T = TypeVar("T")


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(x, 1))))


def candidate_configs(dtype: torch.dtype) -> tuple[KernelConfig, ...]:
    return _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT


def estimate_shared_memory(cfg: KernelConfig, dtype: torch.dtype, kind: Pass) -> int:
    """The shared memory Triton allocates for `cfg`, from above, fitted to compiles for
    sm80-sm90 (tests/test_triton_aot.py checks the real figure of every config the launcher
    picks; a launch that still does not fit falls back, see `_launch`).

    A pipelined loop holds copies of its two tl.dot operand tiles: num_stages - 1 on sm80-89,
    num_stages on sm90 (asynchronous wgmma), so the forward counts num_stages. The backward
    has two such loops plus the (N, V) gradient tile and its transpose; there Triton reuses
    buffers across the loops, and num_stages - 1 copies per loop bounds every compile seen."""
    es = torch.finfo(dtype).bits // 8
    n, v, d = cfg.block_n, cfg.block_v, cfg.block_d
    if kind == "forward":
        return max(cfg.num_stages, 1) * (n * d + d * v) * es
    copies = max(cfg.num_stages - 1, 1)
    return copies * (n * d + d * v + v * d + n * d) * es + 2 * n * v * es


def pick_config(kind: Pass, dtype: torch.dtype, shared_memory: int) -> tuple[int, KernelConfig]:
    """(index, config): the first candidate whose estimate fits `shared_memory` bytes; the
    smallest candidate when none does (its launch then reports the real figure)."""
    tiles = candidate_configs(dtype)
    for i in range(len(tiles)):
        if estimate_shared_memory(tiles[i], dtype, kind) <= shared_memory:
            return i, tiles[i]
    return len(tiles) - 1, tiles[-1]


def interpreter_config(n: int, vocab: int, dim: int) -> KernelConfig:
    # The interpreter's cost grows with programs x ops: few, large tiles.
    return KernelConfig(_pow2(n, 16, 64), _pow2(vocab, 16, 4096), _pow2(dim, 16, 256))


def device_shared_memory(device: torch.device) -> int:
    """The opt-in shared memory per block of `device`, as Triton's launcher checks it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return int(props["max_shared_mem"])
    except Exception:  # no Triton driver: fall back to the per-arch table
        major, minor = torch.cuda.get_device_capability(index)
        return SHARED_MEMORY_BY_ARCH.get(10 * major + minor, min(SHARED_MEMORY_BY_ARCH.values()))


def default_config(n: int, vocab: int, dim: int, dtype: torch.dtype) -> KernelConfig | None:
    """The interpreter's config, or None on a GPU: each launch then picks its own tiles from
    the device's shared memory (`pick_config`)."""
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


# Per (pass, dtype, TF32, shared memory): the candidate index that launched. A compiled kernel
# that needs more shared memory than the device has raises OutOfResources before it runs, so
# falling back to the next candidate is always safe.
_CHOSEN: dict[tuple[str, torch.dtype, bool, int], int] = {}


def _launch(
    kind: Pass,
    cfg: KernelConfig | None,
    dtype: torch.dtype,
    device: torch.device,
    run: Callable[[KernelConfig], T],
) -> T:
    """`run(cfg)`, or, when cfg is None, `run` with the first candidate tile that fits the
    device, falling back to the next smaller one on OutOfResources (never a crash while a
    smaller candidate is left)."""
    if cfg is not None:
        return run(cfg)
    smem = device_shared_memory(device)
    key = (kind, dtype, _precision(dtype) == "tf32", smem)
    tiles = candidate_configs(dtype)
    i = _CHOSEN[key] if key in _CHOSEN else pick_config(kind, dtype, smem)[0]
    while True:
        try:
            out = run(tiles[i])
        except OutOfResources:
            if i + 1 >= len(tiles):
                raise
            i += 1
            continue
        _CHOSEN[key] = i
        return out


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
    rows: torch.Tensor,
    y: torch.Tensor,
    count: torch.Tensor,
    lse: torch.Tensor,
    tgt: torch.Tensor,
    v_per_split: int,
    cfg: KernelConfig,
) -> tuple[tuple, dict]:
    """The forward kernel's positional arguments and keyword options, as launched (the
    ahead-of-time compile test builds its signatures from this very function)."""
    n, dim = hidden.shape
    args = (
        hidden, weight, rows, y, count, lse, tgt,
        n, weight.shape[0], dim, v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return args, kwargs


def backward_kernel_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    y: torch.Tensor,
    count: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    gh: torch.Tensor | None,
    gw: torch.Tensor | None,
    cfg: KernelConfig,
    filter_eps: float = 0.0,
) -> tuple[tuple, dict]:
    """The backward kernel's arguments; gh / gw None = that gradient is not computed;
    ``filter_eps`` > 0 skips vocabulary tiles whose |softmax - onehot| stays below it."""
    dim = hidden.shape[1]
    args = (
        hidden, weight, rows, y, count, lse, scale,
        lse if gh is None else gh, lse if gw is None else gw,  # dummies, never touched
        weight.shape[0], dim, float(filter_eps),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
    )  # fmt: skip
    kwargs = dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype),
        COMPUTE_DH=gh is not None, COMPUTE_DW=gw is not None, FILTER=filter_eps > 0,
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
    rows: torch.Tensor,  # (N,) int64, supervised rows first
    y: torch.Tensor,  # (N,) labels in `rows` order
    count: torch.Tensor,  # () supervised rows, on the device
    block_n: int,  # 0: tiles picked for the device
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
    splits: int,  # 0: heuristic
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per compacted row: log-sum-exp of the logits and the target logit, (N,) fp32 each
    (meaningless past `count`)."""
    _check_launch(hidden, weight, rows)
    n, vocab = hidden.shape[0], weight.shape[0]
    cfg = _config_or_none(block_n, block_v, block_d, num_warps, num_stages, splits)

    def run(tile: KernelConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
        nsplit, v_per_split = _forward_split(tile, n, vocab, hidden.device)
        lse = torch.zeros(nsplit * n, dtype=torch.float32, device=hidden.device)
        tgt = torch.zeros(nsplit * n, dtype=torch.float32, device=hidden.device)
        if n > 0:
            args, kwargs = forward_kernel_args(
                hidden, weight, rows, y, count, lse, tgt, v_per_split, tile
            )
            with _on(hidden.device):
                _lce_forward_kernel[(triton.cdiv(n, tile.block_n), nsplit)](*args, **kwargs)
        return lse, tgt, nsplit

    lse, tgt, nsplit = _launch("forward", cfg, hidden.dtype, hidden.device, run)
    if nsplit == 1:
        return lse, tgt
    return torch.logsumexp(lse.view(nsplit, n), dim=0), tgt.view(nsplit, n).sum(dim=0)


@lce_forward.register_fake
def _(hidden, weight, rows, y, count, block_n, block_v, block_d, num_warps, num_stages, splits):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("ssrengine::lce_backward", mutates_args=("gw_into",))
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
    filter_eps: float,  # 0: no gradient filtering
    gw_into: torch.Tensor | None,  # (V, H) fp32 contiguous: add grad_weight into it instead
    block_n: int,  # 0: tiles picked for the device
    block_v: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 grad_hidden (N, H) and grad_weight (V, H), zero rows where ignored; a gradient that
    is not needed, or that went into ``gw_into``, comes back empty."""
    _check_launch(hidden, weight, rows)
    assert lse.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config_or_none(block_n, block_v, block_d, num_warps, num_stages)

    def run(tile: KernelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        gh = hidden.new_zeros((n, dim) if need_h else (0,), dtype=torch.float32)
        if gw_into is not None:  # the atomics add to what it holds: no zeroed buffer
            assert gw_into.shape == (vocab, dim) and gw_into.is_contiguous()
            assert gw_into.dtype == torch.float32
        gw = (
            gw_into
            if gw_into is not None
            else weight.new_zeros((vocab, dim) if need_w else (0,), dtype=torch.float32)
        )
        if n > 0 and (need_h or need_w):
            args, kwargs = backward_kernel_args(
                hidden, weight, rows, y, count, lse, scale,
                gh if need_h else None, gw if need_w else None, tile, filter_eps,
            )  # fmt: skip
            grid = (triton.cdiv(n, tile.block_n), triton.cdiv(vocab, tile.block_v))
            with _on(hidden.device):
                _lce_backward_kernel[grid](*args, **kwargs)
        # A custom op may not return an alias of an input.
        return gh, (weight.new_empty(0, dtype=torch.float32) if gw_into is not None else gw)

    return _launch("backward", cfg, hidden.dtype, hidden.device, run)


@lce_backward.register_fake
def _(hidden, weight, rows, y, count, lse, scale, need_h, need_w, filter_eps, gw_into, *blocks):
    n, dim = hidden.shape
    gh = hidden.new_empty((n, dim) if need_h else (0,), dtype=torch.float32)
    full = need_w and gw_into is None
    gw = weight.new_empty((weight.shape[0], dim) if full else (0,), dtype=torch.float32)
    return gh, gw


def _blocks(cfg: KernelConfig | None) -> tuple[int, int, int, int, int]:
    if cfg is None:
        return 0, 0, 0, 0, 0
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
        filter_eps: float,
        into_grad: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        ctx.leaf = weight if into_grad and _accumulable(weight) else None
        # An fp32 master weight under autocast is cast here (see cross_entropy.py): its
        # gradient then leaves as the fp32 kernel buffer itself, no copies.
        w_dtype, weight = weight.dtype, weight.to(hidden.dtype)
        cfg = cfg or default_config(n, weight.shape[0], hidden.shape[1], hidden.dtype)
        valid = labels != ignore_index
        rows = torch.argsort((~valid).to(torch.int8), stable=True)  # supervised rows first
        count = valid.sum()  # stays on the device
        y = labels[rows]
        splits = (cfg.splits or 0) if cfg is not None else 0
        lse, tgt = lce_forward(hidden, weight, rows, y, count, *_blocks(cfg), splits)
        in_count = torch.arange(n, device=hidden.device) < count
        w = None if token_weights is None else token_weights[rows].float()
        loss = lse - tgt if w is None else (lse - tgt) * w
        loss = torch.where(in_count, loss, 0.0)  # (N,) compacted order
        ctx.save_for_backward(hidden, weight, rows, y, count, lse, w)
        ctx.per_token, ctx.cfg, ctx.filter_eps, ctx.w_dtype = per_token, cfg, filter_eps, w_dtype
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
        into = _grad_buffer(ctx.leaf) if need_w and ctx.leaf is not None else None
        gh, gw = lce_backward(
            hidden, weight, rows, y, count, lse, scale, need_h, need_w, ctx.filter_eps, into,
            *_blocks(ctx.cfg),
        )  # fmt: skip
        gh = gh.to(hidden.dtype) if need_h else None
        if into is not None:
            # Already added to .grad. Autograd still gets a gradient, so AccumulateGrad runs
            # (and with it DDP's and FSDP2's hooks): a broadcast zero, no (V, H) memory.
            gw = torch.zeros((), dtype=torch.float32, device=weight.device).expand(weight.shape)
        else:
            gw = gw.to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Triton path (no argument checks): the weighted loss sum, or per-token losses (N,).
    ``into_grad``: add an fp32 leaf weight's gradient straight into its .grad (see
    `fused_linear_cross_entropy`)."""
    return _TritonLinearCrossEntropy.apply(
        hidden, weight, labels, token_weights, ignore_index, per_token, cfg, filter_eps, into_grad
    )
