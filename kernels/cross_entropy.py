"""Fused masked linear cross-entropy: loss(hidden @ weight.T, labels) without [N, V] logits.

SSR trains on assistant targets from two sources (the model's own answer or the gold one) and
ignores every prompt token. At Llama-3's 128,256-token vocabulary the [tokens x vocab] logits
dominate activation memory, so neither path here ever holds them:

- `impl="torch"` (this file): rows are compacted to the supervised tokens, then processed in
  chunks of rows, so at most one [chunk, V] tile of logits exists. With reduction "sum" (the
  training case) the gradient is computed in the forward pass chunk by chunk — (softmax -
  onehot) @ W and its transpose, Liger-Kernel's trick — so backward is only a scale. It is the
  CPU training path, the test oracle of the Triton kernels and the benchmark baseline.
- `impl="triton"` (triton_cross_entropy.py): tiles the vocabulary with an online log-sum-exp and
  recomputes logit tiles in backward (Apple's cut-cross-entropy design), with no host sync.

Loss normalization for training (torchtitan/torchtune): count the supervised tokens of the
whole optimizer step first (all micro-batches, all ranks), then per micro-batch call

    loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", normalizer=step_tokens)
    loss.backward()

where `step_tokens` is a 0-d device tensor or a Python number; the gradients then accumulate to
exactly the per-token mean of the step. Averaging micro-batch means instead is the 2024
gradient-accumulation bug. `validate=False` on the hot path skips the label/weight range checks,
which need a host sync (see `_validate_values`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

# Label of a token without a target, as torch.nn.functional.cross_entropy's default.
IGNORE_INDEX = -100

Reduction = Literal["sum", "mean", "none"]
Impl = Literal["auto", "torch", "triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Logits of one row chunk of the torch path: about this many fp32 bytes. 64 MiB keeps the CPU
# matmuls large enough to run near peak while staying far below the [N, V] logits.
CHUNK_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------ checks
class KernelInputError(ValueError):
    """A bad argument of a kernel entry point; `field` names the argument."""

    def __init__(self, message: str, *, field: str) -> None:
        self.message, self.field = message, field
        super().__init__(f"field '{field}': {message}")


def _bad(name: str, message: str) -> KernelInputError:
    return KernelInputError(message, field=name)


def _check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    reduction: str,
    impl: str,
    normalizer: torch.Tensor | float | None,
    autocast: bool = False,
) -> None:
    """Shapes, dtypes, devices and options: metadata only, never a host sync. ``autocast``:
    weight may differ from hidden's dtype (it is cast inside the kernel's autograd node)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise _bad("hidden", f"must be a 2-D tensor [N, H], got shape {_shape(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise _bad("weight", f"must be a 2-D tensor [V, H], got shape {_shape(weight)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise _bad("labels", f"must be a 1-D tensor [N], got shape {_shape(labels)}")
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise _bad("weight", f"shape {tuple(weight.shape)} does not match hidden size H={h}")
    if weight.shape[0] == 0:
        raise _bad("weight", "has an empty vocabulary (V=0)")
    if labels.shape[0] != n:
        raise _bad("labels", f"has {labels.shape[0]} entries, hidden has N={n} rows")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise _bad("hidden", f"dtype {hidden.dtype} is not float32, float16 or bfloat16")
    if weight.dtype not in _FLOAT_DTYPES or (weight.dtype != hidden.dtype and not autocast):
        raise _bad("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise _bad("labels", f"dtype {labels.dtype} is not an integer dtype")
    tensors = {"weight": weight, "labels": labels}
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or token_weights.shape != (n,):
            raise _bad("token_weights", f"must have shape ({n},), got {_shape(token_weights)}")
        if not token_weights.dtype.is_floating_point:
            raise _bad("token_weights", f"dtype {token_weights.dtype} is not a float dtype")
        tensors["token_weights"] = token_weights
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise _bad("normalizer", f"must be a scalar, got shape {tuple(normalizer.shape)}")
        tensors["normalizer"] = normalizer
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise _bad(name, f"is on {t.device}, hidden is on {hidden.device}")
    if reduction not in ("sum", "mean", "none"):
        raise _bad("reduction", f"{reduction!r} is not 'sum', 'mean' or 'none'")
    if impl not in ("auto", "torch", "triton"):
        raise _bad("impl", f"{impl!r} is not 'auto', 'torch' or 'triton'")
    if normalizer is not None:
        if reduction == "mean":
            raise _bad("normalizer", "cannot be combined with reduction='mean' (use 'sum')")
        if not isinstance(normalizer, torch.Tensor) and not normalizer >= 0:
            raise _bad("normalizer", f"{normalizer!r} is negative or NaN")


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _validate_values(
    labels: torch.Tensor, vocab: int, ignore_index: int, token_weights: torch.Tensor | None
) -> None:
    """Value checks. Each `.any()` is a host sync (the CPU waits for every queued GPU kernel),
    which is why the trainer may pass validate=False on its hot path once its data pipeline
    has checked the labels. The cost of skipping: a label outside [0, V) makes the torch path
    raise an index error (a device-side assert on CUDA) and the Triton path silently count the
    token with a target logit of 0 (labels are compared, never used as addresses there)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise _bad(
            "labels",
            f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})",
        )
    if token_weights is not None:
        neg = ~(token_weights >= 0)  # NaN counts as bad too
        if neg.any():
            i = int(neg.nonzero()[0, 0])
            raise _bad(
                "token_weights",
                f"token_weights[{i}] = {float(token_weights[i])} is negative or NaN",
            )


# ------------------------------------------------------------------------- torch reference
def chunk_rows_for(vocab: int) -> int:
    """Rows per chunk so that one [chunk, V] fp32 logit tile is about CHUNK_BYTES."""
    return max(8, min(4096, CHUNK_BYTES // (4 * vocab)))


def _exp_shifted(logits: torch.Tensor, y: torch.Tensor):
    """In place: logits (C, V) fp32 -> exp(logits - rowmax). Returns (lse, target logit, sum of
    exp), each (C,). One tile of memory, unlike torch.logsumexp's temporary."""
    target = logits.gather(1, y[:, None]).squeeze(1)
    rowmax = logits.amax(dim=1)
    logits.sub_(rowmax[:, None]).exp_()
    sumexp = logits.sum(dim=1)
    return rowmax + sumexp.log(), target, sumexp


# 16-bit products added to the fp32 grad_weight go in vocabulary slices of this many rows:
# the (slice, H) temporary, never a (V, H) one (57 MB in bf16 for SmolLM2, 1 GB for Llama-3).
MIXED_SLICE = 4096
# Columns per vocabulary tile of the torch path's gradient filter: large enough that the
# per-tile matmuls of a CPU stay efficient.
FILTER_TILE = 1024


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


def _chunk_grad_logits(
    logits: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:  # fmt: skip
    """In place: logits (C, V) fp32 -> scale * (softmax - onehot(y)); with the tiles to keep
    when filtering (None: all)."""
    logits.sub_(lse[:, None]).exp_()
    tiles = _kept_tiles(logits, torch.ones_like(lse), y, filter_eps) if filter_eps else None
    logits.mul_(scale[:, None])
    return logits.scatter_add_(1, y[:, None], -scale[:, None]), tiles


class _TorchLinearCrossEntropy(torch.autograd.Function):
    """Chunked torch path. Returns the weighted loss sum (per_token=False) or per-token losses.

    Sum: forward stores grad_hidden (N, H) and grad_weight (V, H) in fp32, computed chunk by
    chunk, so backward is a scale; the buffers are freed by that backward (a second backward
    through the same graph raises). Per-token ("none"): grad_output differs per row and enters
    grad_weight's sum, so forward keeps only the log-sum-exp and backward recomputes the chunks.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        labels: torch.Tensor,  # (N,)
        token_weights: torch.Tensor | None,  # (N,)
        ignore_index: int,
        per_token: bool,
        chunk_rows: int | None,
        filter_eps: float,
    ) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        # Under autocast the fp32 master weight comes in and is cast here, not before: its
        # gradient then leaves in fp32 straight from the fp32 buffer, with no 16-bit copy
        # and no copy back through a cast node. (V, H) in the compute dtype.
        w_dtype, weight = weight.dtype, weight.to(hidden.dtype)
        # Compaction: a host sync on CUDA (nonzero), free on the CPU this path is built for.
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        y = labels[rows].long()
        w = None if token_weights is None else token_weights[rows].float()
        chunk = chunk_rows or chunk_rows_for(vocab)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager_grad = not per_token and (need_h or need_w)
        acc = torch.float32
        grad_h = hidden.new_zeros(hidden.shape, dtype=acc) if eager_grad and need_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=acc) if eager_grad and need_w else None
        losses = torch.empty(rows.shape[0], dtype=acc, device=hidden.device)  # (M,)
        lses = torch.empty_like(losses) if per_token else None
        for s in range(0, rows.shape[0], chunk):
            r, yc = rows[s : s + chunk], y[s : s + chunk]
            hc = hidden[r]  # (C, H)
            logits = (hc @ weight.T).float()  # (C, V): the only logit tile alive
            lse, target, sumexp = _exp_shifted(logits, yc)
            losses[s : s + chunk] = lse - target
            if per_token:
                lses[s : s + chunk] = lse
            if eager_grad:
                scale = torch.ones_like(lse) if w is None else w[s : s + chunk]
                tiles = _kept_tiles(logits, sumexp, yc, filter_eps) if filter_eps else None
                # scale * (softmax - onehot), in place
                logits.mul_((scale / sumexp)[:, None])
                logits.scatter_add_(1, yc[:, None], -scale[:, None])
                g = logits.to(hidden.dtype)  # (C, V)
                _accumulate(grad_h, grad_w, g, hc, r, weight, tiles)
                del g
            del logits
        if w is not None:
            losses = losses * w
        ctx.per_token, ctx.chunk, ctx.dtype = per_token, chunk, hidden.dtype
        ctx.filter_eps, ctx.w_dtype = filter_eps, w_dtype
        ctx.grads = (grad_h, grad_w)
        if per_token:
            ctx.save_for_backward(hidden, weight, rows, y, w, lses)
            return hidden.new_zeros(n, dtype=acc).index_copy_(0, rows, losses)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.per_token:
            grad_h, grad_w = ctx.grads
            if grad_h is None and grad_w is None and any(ctx.needs_input_grad[:2]):
                raise RuntimeError("fused_linear_cross_entropy: backward called twice (sum)")
            ctx.grads = (None, None)  # free the buffers with the graph, not later
            if grad_h is not None:
                grad_h = _scaled(grad_h, grad_out, ctx.dtype)
            if grad_w is not None:
                grad_w = _scaled(grad_w, grad_out, ctx.w_dtype)
            return grad_h, grad_w, None, None, None, None, None, None
        hidden, weight, rows, y, w, lses = ctx.saved_tensors
        scale = grad_out.float()[rows]
        if w is not None:
            scale = scale * w
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, rows.shape[0], ctx.chunk):
            r = rows[s : s + ctx.chunk]
            hc = hidden[r]
            logits = (hc @ weight.T).float()
            g, tiles = _chunk_grad_logits(logits, lses[s : s + ctx.chunk], y[s : s + ctx.chunk],
                                          scale[s : s + ctx.chunk], ctx.filter_eps)  # fmt: skip
            g = g.to(hidden.dtype)
            del logits
            _accumulate(grad_h, grad_w, g, hc, r, weight, tiles)
            del g
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Chunked torch path (no checks): the weighted loss sum, or per-token losses (N,) fp32.
    ``filter_eps`` > 0: gradient filtering (`fused_linear_cross_entropy`'s ``grad_filter``)."""
    fn = _TorchLinearCrossEntropy
    return fn.apply(
        hidden, weight, labels, token_weights, ignore_index, per_token, chunk_rows, filter_eps
    )


# --------------------------------------------------------------------------------- public
def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise _bad("impl", f"'triton' needs a CUDA tensor or TRITON_INTERPRET=1, got {device}")
    return impl


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "sum",
    normalizer: torch.Tensor | float | None = None,
    impl: Impl = "auto",
    validate: bool = True,
    grad_filter: bool = False,
    grad_into_weight: bool = False,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, never materializing the logits.

    hidden (N, H) and weight (V, H) share a dtype (fp32, fp16 or bf16; accumulation is fp32);
    labels (N,) are already shifted, `ignore_index` marks unsupervised tokens (prompt, padding).
    token_weights (N,), optional and >= 0, weight each token's loss (e.g. per target source);
    no gradient flows to them. The result is fp32:

    - "sum": Σ w_i·loss_i over supervised tokens (the training reduction, see the module doc);
    - "mean": that sum / Σ w_i over supervised tokens (the token count without weights);
    - "none": per-token w_i·loss_i (N,), 0 where ignored; its sum equals "sum".

    `normalizer` (a Python number or a 0-d device tensor, e.g. the supervised-token count of the
    whole optimizer step) divides the "sum"/"none" result; a normalizer of 0 and an empty or
    all-ignored batch give 0 and zero gradients, never NaN. Gradients flow to hidden and weight
    (only those that require grad are computed). `impl`: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch" (chunked reference), "auto" = triton on CUDA, torch elsewhere.
    `validate=True` checks label range and weight signs at the cost of a host sync.
    Under torch.autocast, hidden and weight are cast to the autocast dtype first.
    `grad_filter=True`: gradient filtering (cut-cross-entropy, arXiv 2411.09009): backward
    skips vocabulary tiles whose softmax entries all lie below `filter_eps_for(dtype)` (and that
    hold no target); the loss is unchanged, the gradients differ by about the dtype's rounding.
    `grad_into_weight=True` (Triton path; for `loss.backward()` only): an fp32 leaf weight's
    gradient is added by the kernel straight into `weight.grad`, with no [V, H] gradient buffer
    per call (gradient accumulation over micro-batches); autograd then sees a broadcast zero
    for it, so `torch.autograd.grad` and tensor hooks on the weight must not be used with it.
    """
    hidden, autocast = _autocast_inputs(hidden)
    with torch.autocast(_device_type(hidden), enabled=False):
        return _fused_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, reduction, normalizer, impl,
            validate, grad_filter, autocast, grad_into_weight,
        )  # fmt: skip


def _device_type(x: object) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else "cpu"


def _autocast_inputs(hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(hidden in the autocast dtype, whether autocast is on), as torch.amp.custom_fwd(
    cast_inputs=...) and an nn.Linear would have it: the lm_head product then runs on tensor
    cores. The weight is cast to the same dtype inside the kernel's autograd node, so the
    gradient of an fp32 master weight is produced in fp32 (no 16-bit copy of it, and no second
    copy back through a cast node)."""
    dev = _device_type(hidden)
    if not torch.is_autocast_enabled(dev):
        return hidden, False
    dtype = torch.get_autocast_dtype(dev)
    if isinstance(hidden, torch.Tensor) and hidden.dtype in _FLOAT_DTYPES:
        hidden = hidden.to(dtype)
    return hidden, True


def _fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    normalizer: torch.Tensor | float | None,
    impl: Impl,
    validate: bool,
    grad_filter: bool = False,
    autocast: bool = False,
    grad_into_weight: bool = False,
) -> torch.Tensor:
    _check_args(hidden, weight, labels, token_weights, reduction, impl, normalizer, autocast)
    if validate:
        _validate_values(labels, weight.shape[0], ignore_index, token_weights)
        if isinstance(normalizer, torch.Tensor) and not bool(normalizer >= 0):
            raise _bad("normalizer", f"{float(normalizer)} is negative or NaN")
    if token_weights is not None:
        token_weights = token_weights.detach()
    per_token = reduction == "none"
    eps = filter_eps_for(hidden.dtype) if grad_filter else 0.0
    if _resolve_impl(impl, hidden.device) == "triton":
        from .triton_cross_entropy import triton_linear_cross_entropy

        loss = triton_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, per_token, filter_eps=eps,
            into_grad=grad_into_weight,
        )  # fmt: skip
    else:  # its weight gradient is built in the forward pass: nothing to save there
        loss = torch_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, per_token, filter_eps=eps
        )
    if reduction == "mean":
        valid = labels != ignore_index
        if token_weights is None:
            denom = valid.sum().float()
        else:
            denom = torch.where(valid, token_weights.float(), 0.0).sum()
        loss = loss / torch.where(denom > 0, denom, 1.0)
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            norm = normalizer.reshape(()).float()
            loss = loss / torch.where(norm > 0, norm, 1.0)
        elif normalizer > 0:
            loss = loss / float(normalizer)
    return loss


# --------------------------------------------------------------------------------- scorer
class SequenceScores(NamedTuple):
    """Log-likelihoods of supervised tokens under the model, per token and per sequence."""

    token_logprobs: torch.Tensor  # (N,) fp32, 0 where ignored
    logprob_sum: torch.Tensor  # (S,) fp32: log p(answer | prompt) of each sequence
    num_tokens: torch.Tensor  # (S,) int64: supervised tokens of each sequence

    @property
    def logprob_mean(self) -> torch.Tensor:
        """(S,) mean per-token log-probability (0 for a sequence with no supervised token)."""
        return self.logprob_sum / self.num_tokens.clamp_min(1)


@torch.no_grad()
def sequence_log_likelihood(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    impl: Impl = "auto",
    validate: bool = True,
) -> SequenceScores:
    """Score packed sequences: per-token and per-sequence log p(label) (no grad).

    hidden (N, H) are the final hidden states of a packed batch, labels (N,) shifted within each
    sequence, cu_seqlens (S + 1,) the sequence boundaries in rows (cu_seqlens[0] = 0,
    cu_seqlens[-1] = N). Used to compare the base model's likelihood of its own answers with the
    gold ones (the SSR paper's Figure 1).
    """
    n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else -1
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise _bad("cu_seqlens", f"must be a 1-D tensor [S + 1], got {_shape(cu_seqlens)}")
    if cu_seqlens.device != getattr(hidden, "device", None):
        raise _bad("cu_seqlens", f"is on {cu_seqlens.device}, hidden is on {hidden.device}")
    if validate:
        c = cu_seqlens.long()
        if int(c[0]) != 0 or int(c[-1]) != n or bool((c.diff() < 0).any()):
            raise _bad(
                "cu_seqlens",
                f"{c.tolist()[:8]}... must start at 0, end at N={n} and never decrease",
            )
    tok = -fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=ignore_index, reduction="none", impl=impl,
        validate=validate,
    )  # fmt: skip
    s = cu_seqlens.numel() - 1
    lengths = cu_seqlens.long().diff()
    seq = torch.repeat_interleave(
        torch.arange(s, device=hidden.device), lengths, output_size=n
    )  # (N,) sequence id of every row; output_size avoids a host sync
    logprob_sum = torch.zeros(s, dtype=torch.float32, device=hidden.device).index_add_(0, seq, tok)
    valid = (labels != ignore_index).long()
    num = torch.zeros(s, dtype=torch.int64, device=hidden.device).index_add_(0, seq, valid)
    return SequenceScores(tok, logprob_sum, num)
