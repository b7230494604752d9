"""The torch path of the fused linear cross-entropy (`impl="torch"`; the API and its checks are
in cross_entropy.py).

Rows are compacted to the supervised tokens, then processed in chunks of rows, so at most one
[chunk, V] tile of logits exists (two with a softcap: the tile and its derivative). With
reduction "sum" (the training case) the gradient is computed in the forward pass chunk by
chunk, (softmax - target) @ W and its transpose (Liger-Kernel's trick), so backward is only a
scale; per-token losses or a differentiable lse recompute the chunks in backward instead. It is
the CPU training path, the test oracle of the Triton kernels and the benchmark baseline.
`token_losses` and `logit_coefficients` are the math both paths share.
"""

from __future__ import annotations

import torch

# Label of a token without a target, as torch.nn.functional.cross_entropy's default.
IGNORE_INDEX = -100
# Logits of one row chunk: about this many fp32 bytes. 64 MiB keeps the CPU matmuls large
# enough to run near peak while staying far below the [N, V] logits.
CHUNK_BYTES = 64 * 2**20


def chunk_rows_for(vocab: int, tiles: int = 1) -> int:
    """Rows per chunk so that the chunk's ``tiles`` [chunk, V] fp32 tiles are about CHUNK_BYTES."""
    return max(8, min(4096, CHUNK_BYTES // (4 * vocab * tiles)))


# 16-bit products added to the fp32 grad_weight go in vocabulary slices of this many rows:
# the (slice, H) temporary, never a (V, H) one (57 MB in bf16 for SmolLM2, 1 GB for Llama-3).
MIXED_SLICE = 4096
# Columns per vocabulary tile of the torch path's gradient filter: large enough that the
# per-tile matmuls of a CPU stay efficient.
FILTER_TILE = 1024
# torch.mm(..., out_dtype=torch.float32): 16-bit inputs, fp32 output, on CUDA (aten::mm.dtype).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _chunk_logits(
    hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(C, V) fp32 logits hc @ weight.T (+ bias). fp16 products leave the matmul in fp32: an
    fp16 logit above 65,504 would be inf (and the loss NaN) before any `.float()`. bf16 has
    fp32's range, so its product is rounded to bf16 first, as a bf16 nn.Linear would."""
    if hc.dtype != torch.float16:
        logits = (hc @ weight.T).float()
    elif hc.is_cuda and _MM_OUT_DTYPE:
        logits = torch.mm(hc, weight.T, out_dtype=torch.float32)  # tensor cores, fp32 out
    else:  # fp32 products over vocabulary slices: a (slice, H) fp32 copy, never (V, H)
        hc32 = hc.float()
        logits = hc.new_empty((hc.shape[0], weight.shape[0]), dtype=torch.float32)
        for a in range(0, weight.shape[0], MIXED_SLICE):
            logits[:, a : a + MIXED_SLICE] = hc32 @ weight[a : a + MIXED_SLICE].float().T
    if bias is not None:
        logits += bias.float()
    return logits


def _softcap_(z: torch.Tensor, softcap: float, want_deriv: bool) -> torch.Tensor | None:
    """In place: z -> softcap * tanh(z / softcap). Returns d(capped)/dz = 1 - tanh^2 (a second
    [C, V] tile) when ``want_deriv``, else None."""
    if not softcap:
        return None
    z.div_(softcap).tanh_()
    deriv = torch.mul(z, z).neg_().add_(1.0) if want_deriv else None
    z.mul_(softcap)
    return deriv


def _row_stats(z: torch.Tensor, y: torch.Tensor, smoothing: float):
    """In place: z (C, V) fp32 logits -> exp(z - rowmax). Returns (lse, target logit, sum of the
    logits or None without smoothing, sum of exp), each (C,). One tile of memory, unlike
    torch.logsumexp's temporary."""
    target = z.gather(1, y[:, None]).squeeze(1)
    zsum = z.sum(dim=1) if smoothing else None
    rowmax = z.amax(dim=1)
    z.sub_(rowmax[:, None]).exp_()
    sumexp = z.sum(dim=1)
    return rowmax + sumexp.log(), target, zsum, sumexp


def token_losses(
    lse: torch.Tensor,
    target: torch.Tensor,
    zsum: torch.Tensor | None,
    vocab: int,
    smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Per-token loss from the row statistics (both paths): cross-entropy against
    (1 - smoothing) * onehot + smoothing / V (F.cross_entropy's label_smoothing), plus
    z_loss * lse^2."""
    loss = lse - target if not smoothing else lse - (1 - smoothing) * target - zsum * (smoothing / vocab)  # fmt: skip
    return loss + z_loss * lse.square() if z_loss else loss


def upstream_scale(
    grad_out: torch.Tensor | None,
    rows: torch.Tensor,
    n: int,
    per_token: bool,
    w: torch.Tensor | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """d total / d (row's weighted loss) times its token weight, (n,) fp32, for the n rows the
    backward computes: a per-token loss's upstream gradient at ``rows``, a reduced loss's
    scalar broadcast; zeros (shaped ``like``) when only the lse output has a gradient."""
    if grad_out is None:
        scale = torch.zeros_like(like)
    else:
        g = grad_out.float()
        scale = g[rows] if per_token else g.expand(n)
    return scale if w is None else scale * w


def logit_coefficients(
    scale: torch.Tensor, lse: torch.Tensor, z_loss: float, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef_p, coef_y), (rows,) fp32 each: the gradient of the loss with respect to a row's
    (capped) logits is coef_p * softmax - coef_y * ((1 - smoothing) * onehot + smoothing / V).
    ``scale``: d total / d (row's weighted loss) times its token weight; z-loss adds
    2 * z_loss * lse * scale to the softmax's coefficient, an upstream lse gradient its own."""
    coef_p = scale * (1 + 2 * z_loss * lse) if z_loss else scale
    if grad_lse is not None:
        coef_p = coef_p + grad_lse.float()
    return coef_p, scale


def filter_eps_for(dtype: torch.dtype) -> float:
    """The gradient-filter threshold of a compute dtype: its machine epsilon / 32, as in
    cut-cross-entropy ("auto"): 2^-12 for bf16, 2^-15 for fp16, 2^-28 for fp32. A logit
    gradient below it is lost to rounding once added to the ~1-sized entries around it."""
    return torch.finfo(dtype).eps / 32


def _kept_tiles(
    e: torch.Tensor, sumexp: torch.Tensor, y: torch.Tensor, eps: float
) -> list[tuple[int, int]]:
    """Column ranges of the vocabulary tiles to keep: e (C, V) = exp(logits - shift) with row
    sums ``sumexp`` (C,), so e / sumexp is the softmax. A tile is dropped when every softmax
    entry of every row is below ``eps`` and it holds no target. Host-side list: a sync on CUDA
    (`tolist`), free on the CPU this path is built for."""
    c, vocab = e.shape
    full = vocab // FILTER_TILE * FILTER_TILE
    parts = [e[:, :full].view(c, -1, FILTER_TILE).amax(2)] if full else []
    if full < vocab:
        parts.append(e[:, full:].amax(1, keepdim=True))
    tile_max = torch.cat(parts, dim=1)  # (C, T)
    keep = (tile_max >= eps * sumexp[:, None]).any(0)  # (T,)
    keep[torch.div(y, FILTER_TILE, rounding_mode="floor")] = True
    return [(t * FILTER_TILE, min(vocab, (t + 1) * FILTER_TILE)) for t in keep.nonzero().flatten().tolist()]  # fmt: skip


def _grad_logits_(
    e: torch.Tensor,  # (C, V) fp32 exp(logits - shift), overwritten
    norm: torch.Tensor,  # (C,) its row sums (ones when the shift is the lse)
    y: torch.Tensor,
    coef_p: torch.Tensor,
    coef_y: torch.Tensor,
    smoothing: float,
    deriv: torch.Tensor | None,  # (C, V) d(capped)/d(logit), softcap only
) -> torch.Tensor:
    """In place: e -> d loss / d logits (before the cap) = (coef_p * softmax - coef_y *
    target distribution) * deriv (`logit_coefficients`)."""
    e.mul_((coef_p / norm)[:, None])
    if smoothing:
        e.sub_((coef_y * (smoothing / e.shape[1]))[:, None])
    e.scatter_add_(1, y[:, None], -(coef_y * (1 - smoothing))[:, None])
    return e.mul_(deriv) if deriv is not None else e


class _TorchLinearCrossEntropy(torch.autograd.Function):
    """Chunked torch path. Returns (the weighted loss sum, or per-token losses; per-token lse).

    Sum without a differentiable lse: forward stores grad_hidden (N, H), grad_weight (V, H) and
    grad_bias (V,) in fp32, computed chunk by chunk, so backward is a scale; the buffers are
    freed by that backward (a second backward through the same graph raises). Per-token
    ("none") or with ``want_lse``: the upstream gradient differs per row and enters
    grad_weight's sum, so forward keeps only the log-sum-exp and backward recomputes the chunks.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,)
        token_weights: torch.Tensor | None,  # (N,)
        ignore_index: int,
        per_token: bool,
        chunk_rows: int | None,
        filter_eps: float,
        softcap: float,  # 0: none
        smoothing: float,
        z_loss: float,
        want_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        # Under autocast the fp32 master weight comes in and is cast here, not before: its
        # gradient then leaves in fp32 straight from the fp32 buffer, with no 16-bit copy
        # and no copy back through a cast node. (V, H) in the compute dtype.
        w_dtype, weight = weight.dtype, weight.to(hidden.dtype)
        b_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(hidden.dtype)
        # Compaction: a host sync on CUDA (nonzero), free on the CPU this path is built for.
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        y = labels[rows].long()
        w = None if token_weights is None else token_weights[rows].float()
        chunk = chunk_rows or chunk_rows_for(vocab, 2 if softcap else 1)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        eager = not per_token and not want_lse and (need_h or need_w or need_b)
        acc = torch.float32
        grad_h = hidden.new_zeros(hidden.shape, dtype=acc) if eager and need_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=acc) if eager and need_w else None
        grad_b = weight.new_zeros(vocab, dtype=acc) if eager and need_b else None
        losses = torch.empty(rows.shape[0], dtype=acc, device=hidden.device)  # (M,)
        lses = torch.empty_like(losses)
        for s in range(0, rows.shape[0], chunk):
            r, yc = rows[s : s + chunk], y[s : s + chunk]
            hc = hidden[r]  # (C, H)
            z = _chunk_logits(hc, weight, bias)  # (C, V): the only logit tile alive
            deriv = _softcap_(z, softcap, eager)
            lse, target, zsum, sumexp = _row_stats(z, yc, smoothing)
            losses[s : s + chunk] = token_losses(lse, target, zsum, vocab, smoothing, z_loss)
            lses[s : s + chunk] = lse
            if eager:
                scale = torch.ones_like(lse) if w is None else w[s : s + chunk]
                tiles = _kept_tiles(z, sumexp, yc, filter_eps) if filter_eps else None
                coef_p, coef_y = logit_coefficients(scale, lse, z_loss, None)
                g = _grad_logits_(z, sumexp, yc, coef_p, coef_y, smoothing, deriv)
                if grad_b is not None:
                    grad_b += g.sum(dim=0)
                g = g.to(hidden.dtype)  # (C, V)
                _accumulate(grad_h, grad_w, g, hc, r, weight, tiles)
                del g
            del z, deriv
        if w is not None:
            losses = losses * w
        ctx.per_token, ctx.chunk, ctx.dtype = per_token, chunk, hidden.dtype
        ctx.opts = (filter_eps, softcap, smoothing, z_loss)
        ctx.w_dtype, ctx.b_dtype = w_dtype, b_dtype
        ctx.grads, ctx.eager = (grad_h, grad_w, grad_b), eager
        lse_out = hidden.new_zeros(n, dtype=acc).index_copy_(0, rows, lses)
        if not want_lse:
            ctx.mark_non_differentiable(lse_out)
        if not eager:
            ctx.save_for_backward(hidden, weight, bias, rows, y, w, lses)
        if per_token:
            return hidden.new_zeros(n, dtype=acc).index_copy_(0, rows, losses), lse_out
        return losses.sum(), lse_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        nones = (None,) * 10
        if ctx.eager:
            return _TorchLinearCrossEntropy._eager_backward(ctx, grad_out) + nones
        hidden, weight, bias, rows, y, w, lses = ctx.saved_tensors
        filter_eps, softcap, smoothing, z_loss = ctx.opts
        scale = upstream_scale(grad_out, rows, rows.shape[0], ctx.per_token, w, lses)
        coef_p, coef_y = logit_coefficients(
            scale, lses, z_loss, None if grad_lse is None else grad_lse[rows]
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0], dtype=torch.float32) if need_b else None
        for s in range(0, rows.shape[0], ctx.chunk):
            r, yc, c = rows[s : s + ctx.chunk], y[s : s + ctx.chunk], slice(s, s + ctx.chunk)
            hc = hidden[r]
            z = _chunk_logits(hc, weight, bias)
            deriv = _softcap_(z, softcap, True)
            z.sub_(lses[c, None]).exp_()  # the softmax
            ones = torch.ones_like(lses[c])
            tiles = _kept_tiles(z, ones, yc, filter_eps) if filter_eps else None
            g = _grad_logits_(z, ones, yc, coef_p[c], coef_y[c], smoothing, deriv)
            if grad_b is not None:
                grad_b += g.sum(dim=0)
            g = g.to(hidden.dtype)
            del z, deriv
            _accumulate(grad_h, grad_w, g, hc, r, weight, tiles)
            del g
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(ctx.w_dtype)
        grad_b = None if grad_b is None else grad_b.to(ctx.b_dtype)
        return (grad_h, grad_w, grad_b) + nones

    @staticmethod
    def _eager_backward(ctx, grad_out: torch.Tensor | None) -> tuple:
        grad_h, grad_w, grad_b = ctx.grads
        if grad_h is None and grad_w is None and grad_b is None and any(ctx.needs_input_grad[:3]):
            raise RuntimeError("fused_linear_cross_entropy: backward called twice (sum)")
        ctx.grads = (None, None, None)  # free the buffers with the graph, not later
        if grad_out is None:
            return None, None, None
        if grad_h is not None:
            grad_h = _scaled(grad_h, grad_out, ctx.dtype)
        if grad_w is not None:
            grad_w = _scaled(grad_w, grad_out, ctx.w_dtype)
        if grad_b is not None:
            grad_b = _scaled(grad_b, grad_out, ctx.b_dtype)
        return grad_h, grad_w, grad_b


def _accumulate(
    grad_h: torch.Tensor | None,  # (N, H) fp32
    grad_w: torch.Tensor | None,  # (V, H) fp32
    g: torch.Tensor,  # (C, V) grad of the chunk's logits, in the input dtype
    hc: torch.Tensor,  # (C, H)
    rows: torch.Tensor,  # (C,)
    weight: torch.Tensor,  # (V, H)
    tiles: list[tuple[int, int]] | None = None,  # vocabulary column ranges; None = all
) -> None:
    if tiles is None:
        if grad_h is not None:
            grad_h[rows] = (g @ weight).float()
        if grad_w is not None and grad_w.dtype == g.dtype:
            grad_w.addmm_(g.T, hc)  # no (V, H) temporary
            return
        tiles = [(a, a + MIXED_SLICE) for a in range(0, weight.shape[0], MIXED_SLICE)]
        grad_h = None  # done above
    if grad_h is not None:
        gh = torch.zeros(g.shape[0], weight.shape[1], dtype=torch.float32, device=g.device)
        for a, b in tiles:
            gh += (g[:, a:b] @ weight[a:b]).float()
        grad_h[rows] = gh
    if grad_w is not None:
        for a, b in tiles:
            if grad_w.dtype == g.dtype:
                grad_w[a:b].addmm_(g[:, a:b].T, hc)  # no (V, H) temporary
            else:
                grad_w[a:b] += g[:, a:b].T @ hc


def _scaled(buf: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buf * grad_out in `dtype`, reusing buf's memory where the dtype allows."""
    if buf.dtype == dtype:
        return buf.mul_(grad_out)
    return buf.to(dtype).mul_(grad_out.to(dtype))


def torch_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    per_token: bool = False,
    chunk_rows: int | None = None,
    filter_eps: float = 0.0,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked torch path (no checks): the weighted loss sum, or per-token losses (N,) fp32;
    with ``return_lse`` also the per-token log-sum-exp (N,), differentiable, 0 where ignored.
    ``filter_eps`` > 0: gradient filtering (`fused_linear_cross_entropy`'s ``grad_filter``)."""
    loss, lse = _TorchLinearCrossEntropy.apply(
        hidden, weight, bias, labels, token_weights, ignore_index, per_token, chunk_rows,
        filter_eps, float(softcap or 0.0), float(label_smoothing), float(z_loss), return_lse,
    )  # fmt: skip
    return (loss, lse) if return_lse else loss
