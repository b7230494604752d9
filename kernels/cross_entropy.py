"""Fused masked linear cross-entropy: loss(hidden @ weight.T, labels) without [N, V] logits.

SSR trains on assistant targets from two sources (the model's own answer or the gold one) and
ignores every prompt token. At Llama-3's 128,256-token vocabulary the [tokens x vocab] logits
dominate activation memory, so neither path here ever holds them:

- `impl="torch"` (torch_cross_entropy.py): rows are compacted to the supervised tokens, then processed in
  chunks of rows, so at most one [chunk, V] tile of logits exists. With reduction "sum" (the
  training case) the gradient is computed in the forward pass chunk by chunk — (softmax -
  onehot) @ W and its transpose, Liger-Kernel's trick — so backward is only a scale. It is the
  CPU training path, the test oracle of the Triton kernels and the benchmark baseline.
- `impl="triton"` (triton_cross_entropy.py): tiles the vocabulary with an online log-sum-exp and
  recomputes logit tiles in backward (Apple's cut-cross-entropy design), with no host sync.

Beyond plain cross-entropy, both paths take what Liger-Kernel and cut-cross-entropy take: an
lm_head ``bias``, final-logit ``softcap`` (Gemma-2: z -> c * tanh(z / c)), ``label_smoothing``
(F.cross_entropy's definition) and a ``z_loss`` coefficient (PaLM / OLMo: + coef * lse^2 per
token), each with per-token weights; ``return_lse`` also returns every token's log-sum-exp,
differentiable. Every one of them reduces to per-row coefficients of the logit gradient
(`torch_cross_entropy.logit_coefficients`), so no pass holds more than one [rows, V] tile
either way.

This file is the API: argument checks, the reductions and the scorer.

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

import math
from typing import Literal, NamedTuple

import torch

from .torch_cross_entropy import IGNORE_INDEX, filter_eps_for, torch_linear_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "KernelInputError",
    "LossWithLSE",
    "SequenceScores",
    "filter_eps_for",
    "fused_linear_cross_entropy",
    "sequence_log_likelihood",
    "torch_linear_cross_entropy",
]

Reduction = Literal["sum", "mean", "none"]
Impl = Literal["auto", "torch", "triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    bias: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes, devices and options: metadata only, never a host sync. ``autocast``:
    weight and bias may differ from hidden's dtype (cast inside the kernel's autograd node)."""
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
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise _bad("bias", f"must have shape ({weight.shape[0]},), got {_shape(bias)}")
        if bias.dtype not in _FLOAT_DTYPES or (bias.dtype != weight.dtype and not autocast):
            raise _bad("bias", f"dtype {bias.dtype} differs from weight's {weight.dtype}")
        tensors["bias"] = bias
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


def _check_logit_options(
    softcap: float | None, label_smoothing: float, z_loss: float, grad_filter: bool
) -> None:
    """The scalar options of the loss (plain floats: no host sync)."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise _bad("softcap", f"{softcap!r} is not a positive finite number (None: no capping)")
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing <= 1):
        raise _bad("label_smoothing", f"{label_smoothing!r} is not in [0, 1]")
    if not (isinstance(z_loss, (int, float)) and 0 <= z_loss < math.inf):
        raise _bad("z_loss", f"{z_loss!r} is not a finite number >= 0")
    if grad_filter and label_smoothing > 0:
        # Smoothing puts label_smoothing / V on every column: a skipped tile would drop a
        # systematic share of the gradient, not a rounding error.
        raise _bad("grad_filter", "cannot be combined with label_smoothing > 0")


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


# --------------------------------------------------------------------------------- public
class LossWithLSE(NamedTuple):
    """`fused_linear_cross_entropy(..., return_lse=True)`."""

    loss: torch.Tensor  # as without return_lse (z-loss included)
    lse: torch.Tensor  # (N,) fp32 log-sum-exp of each token's logits, 0 where ignored; has grad
    z_loss: torch.Tensor  # the z-loss part of `loss`, reduced the same way, detached (logging)


class LogitOptions(NamedTuple):
    """The options of `fused_linear_cross_entropy` that change the loss of a token."""

    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    return_lse: bool = False


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
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "sum",
    normalizer: torch.Tensor | float | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    impl: Impl = "auto",
    validate: bool = True,
    grad_filter: bool = False,
    grad_into_weight: bool = False,
) -> torch.Tensor | LossWithLSE:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `labels`, never
    materializing them.

    hidden (N, H), weight (V, H) and bias (V,), optional, share a dtype (fp32, fp16 or bf16;
    accumulation is fp32); labels (N,) are already shifted, `ignore_index` marks unsupervised
    tokens (prompt, padding). token_weights (N,), optional and >= 0, weight each token's loss
    (e.g. per target source); no gradient flows to them. The result is fp32:

    - "sum": Σ w_i·loss_i over supervised tokens (the training reduction, see the module doc);
    - "mean": that sum / Σ w_i over supervised tokens (the token count without weights);
    - "none": per-token w_i·loss_i (N,), 0 where ignored; its sum equals "sum".

    The logits and each token's loss: `softcap` c caps the logits to c·tanh(z / c) (Gemma-2's
    final_logit_softcapping; None: no cap); `label_smoothing` ε targets (1 - ε)·onehot + ε / V,
    as F.cross_entropy does; `z_loss` adds z_loss · lse² (PaLM's auxiliary loss, lse = log Σ
    exp of the token's logits), weighted with the token like the rest of its loss.
    `return_lse=True` returns `LossWithLSE(loss, lse, z_loss)`: the per-token lse (N,) carries
    gradients into hidden, weight and bias like the loss does.

    `normalizer` (a Python number or a 0-d device tensor, e.g. the supervised-token count of the
    whole optimizer step) divides the "sum"/"none" result; a normalizer of 0 and an empty or
    all-ignored batch give 0 and zero gradients, never NaN. Gradients flow to hidden, weight and
    bias (only those that require grad are computed). `impl`: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch" (chunked reference), "auto" = triton on CUDA, torch elsewhere.
    `validate=True` checks label range and weight signs at the cost of a host sync.
    Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first.
    `grad_filter=True`: gradient filtering (cut-cross-entropy, arXiv 2411.09009): backward
    skips vocabulary tiles whose softmax entries all lie below `filter_eps_for(dtype)` (and that
    hold no target); the loss is unchanged, the gradients differ by about the dtype's rounding.
    Not with label smoothing, which gives every column a share of the gradient.
    `grad_into_weight=True` (Triton path; for `loss.backward()` only): an fp32 leaf weight's
    gradient is added by the kernel straight into `weight.grad`, with no [V, H] gradient buffer
    per call (gradient accumulation over micro-batches); autograd then sees a broadcast zero
    for it, so `torch.autograd.grad` and tensor hooks on the weight must not be used with it.
    """
    hidden, autocast = _autocast_inputs(hidden)
    opts = LogitOptions(softcap, label_smoothing, z_loss, return_lse)
    with torch.autocast(_device_type(hidden), enabled=False):
        return _fused_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, reduction, normalizer, impl,
            validate, grad_filter, autocast, grad_into_weight, bias, opts,
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
    bias: torch.Tensor | None = None,
    opts: LogitOptions = LogitOptions(),  # noqa: B008 (an immutable NamedTuple)
) -> torch.Tensor | LossWithLSE:
    _check_args(hidden, weight, labels, token_weights, reduction, impl, normalizer, autocast, bias)
    _check_logit_options(opts.softcap, opts.label_smoothing, opts.z_loss, grad_filter)
    if validate:
        _validate_values(labels, weight.shape[0], ignore_index, token_weights)
        if isinstance(normalizer, torch.Tensor) and not bool(normalizer >= 0):
            raise _bad("normalizer", f"{float(normalizer)} is negative or NaN")
    if token_weights is not None:
        token_weights = token_weights.detach()
    per_token = reduction == "none"
    eps = filter_eps_for(hidden.dtype) if grad_filter else 0.0
    kw = dict(
        bias=bias, softcap=opts.softcap, label_smoothing=opts.label_smoothing,
        z_loss=opts.z_loss, return_lse=opts.return_lse,
    )  # fmt: skip
    if _resolve_impl(impl, hidden.device) == "triton":
        from .triton_cross_entropy import triton_linear_cross_entropy

        out = triton_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, per_token, filter_eps=eps,
            into_grad=grad_into_weight, **kw,
        )  # fmt: skip
    else:  # its weight gradient is built in the forward pass unless the lse is differentiable
        out = torch_linear_cross_entropy(
            hidden, weight, labels, token_weights, ignore_index, per_token, filter_eps=eps, **kw
        )
    loss, lse = out if opts.return_lse else (out, None)
    if not opts.return_lse:
        return _reduce(loss, labels, ignore_index, token_weights, reduction, normalizer)
    zl = lse.detach().square() * opts.z_loss
    if token_weights is not None:
        zl = zl * token_weights.float()
    zl = zl if per_token else zl.sum()
    return LossWithLSE(
        _reduce(loss, labels, ignore_index, token_weights, reduction, normalizer),
        lse,
        _reduce(zl, labels, ignore_index, token_weights, reduction, normalizer),
    )


def _reduce(
    loss: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    token_weights: torch.Tensor | None,
    reduction: Reduction,
    normalizer: torch.Tensor | float | None,
) -> torch.Tensor:
    """The summed or per-token ``loss`` divided as ``reduction`` and ``normalizer`` say."""
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
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    impl: Impl = "auto",
    validate: bool = True,
) -> SequenceScores:
    """Score packed sequences: per-token and per-sequence log p(label) (no grad).

    hidden (N, H) are the final hidden states of a packed batch, labels (N,) shifted within each
    sequence, cu_seqlens (S + 1,) the sequence boundaries in rows (cu_seqlens[0] = 0,
    cu_seqlens[-1] = N); the logits are those of `fused_linear_cross_entropy` (``bias``,
    ``softcap``). Used to compare the base model's likelihood of its own answers with the gold
    ones (the SSR paper's Figure 1).
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
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none",
        softcap=softcap, impl=impl, validate=validate,
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
