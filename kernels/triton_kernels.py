"""The Triton kernels of the fused linear cross-entropy: the forward (online log-sum-exp over
vocabulary tiles) and the backward (recomputed logit tiles, gradients added with atomics).
triton_cross_entropy.py launches them and explains the design.

The @triton.jit functions live alone in this file: Triton's cache key of a kernel includes its
line number, so edits to the launchers do not invalidate the compiled kernels (the
ahead-of-time compile in kernels/aot.py and its test reuse them).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from one exp, the same code on a GPU and in the interpreter (which has no
    libdevice); exp(-2|x|) never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(
    H, W, BIAS, rows, row_ok, cols, col_ok, D, SOFTCAP,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_V) fp32 logits of rows x cols: hidden @ weight.T (+ bias), capped to
    SOFTCAP * tanh(z / SOFTCAP) under HAS_SOFTCAP. Masked rows and columns hold 0 (+ bias)."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
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
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = SOFTCAP * _tanh(acc / SOFTCAP)
    return acc


@triton.jit
def _lce_forward_kernel(
    H, W, BIAS, ROWS, Y, COUNT, LSE_OUT, TGT_OUT, SUMZ_OUT,
    N, V, D, V_PER_SPLIT, SOFTCAP,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SUM_LOGITS: tl.constexpr,
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

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(logit - m)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)  # sum of the logits (label smoothing)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z = _logit_tile(
            H, W, BIAS, rows, row_ok, cols, col_ok, D, SOFTCAP,
            stride_hn, stride_hd, stride_wv, stride_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION, HAS_BIAS, HAS_SOFTCAP,
        )  # fmt: skip
        if SUM_LOGITS:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * N + offs
    tl.store(LSE_OUT + out, m + tl.log(s), mask=row_ok)
    tl.store(TGT_OUT + out, tgt, mask=row_ok)
    if SUM_LOGITS:
        tl.store(SUMZ_OUT + out, zsum, mask=row_ok)


@triton.jit
def _lce_backward_kernel(
    H, W, BIAS, ROWS, Y, COUNT, LSE, COEF_P, COEF_Y, GH, GW, GB,
    V, D, FILTER_EPS, SOFTCAP, SMOOTHING,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
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
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)

    # the logit tile again (the forward kept only its log-sum-exp)
    z = _logit_tile(
        H, W, BIAS, rows, row_ok, cols, col_ok, D, SOFTCAP,
        stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION, HAS_BIAS, HAS_SOFTCAP,
    )  # fmt: skip
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # the softmax
    is_y = cols[None, :] == y[:, None]
    if FILTER:  # noqa: SIM102 (a constexpr branch: compiled out when off)
        # Gradient filtering (cut-cross-entropy, arXiv 2411.09009, section 4.3): a tile where
        # every softmax entry is below FILTER_EPS (the compute dtype's eps / 32) and no row has
        # its target changes no gradient entry by more than the 16-bit rounding of its
        # neighbours: skip both products.
        if tl.max(tl.where(row_ok[:, None], tl.where(is_y, 1.0, p), 0.0)) < FILTER_EPS:
            return
    # d loss / d logits = COEF_P * softmax - COEF_Y * target distribution
    # (torch_cross_entropy.logit_coefficients); 0 in masked rows (both coefficients load as 0)
    # and columns.
    coef_p = tl.load(COEF_P + offs, mask=row_ok, other=0.0)
    coef_y = tl.load(COEF_Y + offs, mask=row_ok, other=0.0)
    if HAS_SMOOTHING:
        target = tl.where(is_y, 1.0 - SMOOTHING, 0.0) + SMOOTHING / V
        g = tl.where(col_ok[None, :], coef_p[:, None] * p - coef_y[:, None] * target, 0.0)
    else:
        g = coef_p[:, None] * p - tl.where(is_y, coef_y[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / SOFTCAP  # tanh of the uncapped logit / SOFTCAP
        g = g * (1.0 - t * t)
    if COMPUTE_DB:
        tl.atomic_add(GB + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
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
