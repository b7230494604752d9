"""The fused loss's logit options on both paths against an fp64 oracle, every gradient.

Final-logit softcapping (Gemma-2), label smoothing (F.cross_entropy's definition, which the
oracle calls), z-loss (PaLM) and the returned, differentiable log-sum-exp, an lm_head bias:
each with per-token weights, through the torch path (eager gradients, and recomputed ones when
the lse is returned) and the Triton kernels (in the interpreter). The oracle is full logits in
fp64 from the same rounded inputs; 16-bit errors are bounded by naive torch in that dtype, as in
test_cross_entropy.py. Also: fp16 logits past 65,504 (finite, exact), Liger-Kernel as a peer
for bias + smoothing + z-loss, and bad options named by argument.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssrengine.kernels.triton_cross_entropy import KernelConfig, triton_linear_cross_entropy

from ssrengine.kernels import fused_linear_cross_entropy
from tests.test_cross_entropy import IGNORE, IMPLS, assert_close, make_inputs

# name -> fused_linear_cross_entropy options; "lse"/"all" also backpropagate through the lse.
OPTIONS = {
    "softcap": dict(softcap=3.0),  # logits of std ~2: well inside tanh's bend
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.02),  # the torch path's eager gradients
    "lse": dict(z_loss=0.02, return_lse=True),  # recomputed, plus a gradient into the lse
    "bias": dict(bias=True),
    "all": dict(bias=True, softcap=3.0, label_smoothing=0.1, z_loss=0.02, return_lse=True),
    "all_eager": dict(bias=True, softcap=3.0, label_smoothing=0.1, z_loss=0.02),
}


def oracle(h, w, b, y, tw, reduction, *, softcap=None, label_smoothing=0.0, z_loss=0.0, **_):
    """Full logits and F.cross_entropy in the dtype of the inputs; (loss, lse masked to 0)."""
    z = h @ w.T if b is None else h @ w.T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = y != IGNORE
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), 0.0)
    ce = F.cross_entropy(
        z, y, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing
    )
    loss = ce + z_loss * lse.square()
    if tw is not None:
        loss = loss * tw.to(loss.dtype)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        denom = valid.sum() if tw is None else tw.to(loss.dtype)[valid].sum()
        loss = loss.sum() / denom
    return loss, lse


def ours(impl, cfg=None, **opts):
    def fn(h, w, b, y, tw, reduction):
        kw = {k: v for k, v in opts.items() if k != "bias"}
        if impl == "triton" and cfg is not None:  # small tiles: many vocabulary tiles
            kw.pop("return_lse", None)
            loss, lse = triton_linear_cross_entropy(
                h, w, y, tw, IGNORE, reduction == "none", cfg, bias=b, return_lse=True, **kw
            )
            return loss, lse
        out = fused_linear_cross_entropy(
            h, w, y, bias=b, token_weights=tw, reduction=reduction, impl=impl, **kw
        )
        return (out.loss, out.lse) if opts.get("return_lse") else (out, None)

    return fn


def run(fn, hidden, weight, bias, labels, tw, reduction, dtype=None, lse_grad=True):
    """(loss, lse or None, grad_hidden, grad_weight, grad_bias) for fixed upstream gradients
    of the loss and (``lse_grad``) of the lse."""
    cast = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach())
    h, w = cast(hidden).requires_grad_(), cast(weight).requires_grad_()
    b = None if bias is None else cast(bias).requires_grad_()
    t = None if tw is None else tw.to(torch.float64 if dtype == torch.float64 else tw.dtype)
    loss, lse = fn(h, w, b, labels, t, reduction)
    n = labels.shape[0]
    go = torch.linspace(-1.0, 2.0, n) if reduction == "none" else torch.tensor(0.7)
    total = (loss * go.to(loss.dtype)).sum()
    if lse is not None and lse_grad:
        total = total + (lse * torch.linspace(0.5, -1.5, n).to(lse.dtype)).sum()
    leaves = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(total, leaves)
    gb = grads[2] if b is not None else None
    return loss.detach(), None if lse is None else lse.detach(), grads[0], grads[1], gb


def check(fn, opts, hidden, weight, bias, labels, tw, reduction, dtype):
    lse_grad = bool(opts.get("return_lse"))

    def truth_fn(h, w, b, y, t, red):
        loss, lse = oracle(h, w, b, y, t, red, **opts)
        return loss, (lse if lse_grad else None)

    truth = run(truth_fn, hidden, weight, bias, labels, tw, reduction, torch.float64, lse_grad)
    got = run(fn, hidden, weight, bias, labels, tw, reduction, lse_grad=lse_grad)
    ref = run(truth_fn, hidden, weight, bias, labels, tw, reduction, lse_grad=lse_grad)
    names = ("loss", "lse", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, t, r in zip(names, got, truth, ref):
        if t is None:
            assert a is None or name == "lse", f"{name}: got a value where none was expected"
            continue
        assert a is not None, f"{name}: missing"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if dtype == torch.float32:
            assert_close(name, a, t, rtol=2e-5, atol=2e-5)
        else:
            assert_close(name, a, t, r)


def inputs(dtype, opts, seed=0, n=37, h=24, v=101):
    hidden, weight, labels, tw = make_inputs(n, h, v, dtype, 0.4, weighted=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    bias = (torch.randn(v, generator=g) * 2).to(dtype) if opts.get("bias") else None
    return hidden, weight, bias, labels, tw


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_option_matches_fp64(impl, dtype, option, reduction):
    opts = OPTIONS[option]
    hidden, weight, bias, labels, tw = inputs(dtype, opts)
    check(ours(impl, **opts), opts, hidden, weight, bias, labels, tw, reduction, dtype)


@pytest.mark.parametrize("option", ["all", "all_eager"])
@pytest.mark.parametrize("impl", IMPLS)
def test_all_options_in_fp16_and_mean(impl, option):
    opts = OPTIONS[option]
    hidden, weight, bias, labels, tw = inputs(torch.float16, opts, seed=3)
    check(ours(impl, **opts), opts, hidden, weight, bias, labels, tw, "mean", torch.float16)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.interpreter
def test_triton_options_across_tiles_and_splits(dtype, reduction):
    """Many vocabulary tiles and 3 vocabulary splits: the bias per column tile, the logit sums
    of smoothing merged across splits, the bias gradient's atomics across row blocks."""
    cfg = KernelConfig(block_n=16, block_v=32, block_d=16, splits=3)
    opts = OPTIONS["all"]
    hidden, weight, bias, labels, tw = inputs(dtype, opts, seed=1, n=77, h=40, v=301)
    check(ours("triton", cfg, **opts), opts, hidden, weight, bias, labels, tw, reduction, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_logits_past_65504_stay_finite_and_exact(impl, reduction):
    """fp16 inputs whose logits reach ~10^6: fp16 products would be inf (naive fp16 is), ours
    leave the matmul in fp32. Loss and lse match fp64 to fp32 accuracy; each gradient entry is
    within the fp16 rounding of the logit gradients that enter its product (2^-11 relative per
    term: |dL/dz| @ |W| for the hidden states, |dL/dz|.T @ |H| for the weight, plus fp16's
    smallest step per term for the entries that underflow) and of itself."""
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randint(-300, 301, (40, 16), generator=g)).half()  # exact in fp16
    weight = (torch.randint(-300, 301, (97, 16), generator=g)).half()
    labels = torch.randint(0, 97, (40,), generator=g)
    labels[::5] = IGNORE
    assert torch.isinf(hidden @ weight.T).any(), "the test needs fp16 logits past 65,504"
    tw = torch.rand(40, generator=g) * 2
    opts = dict(z_loss=1e-7, return_lse=True)
    truth = run(
        lambda h, w, b, y, t, r: oracle(h, w, b, y, t, r, **opts),
        hidden, weight, None, labels, tw, reduction, torch.float64,
    )  # fmt: skip
    got = run(ours(impl, **opts), hidden, weight, None, labels, tw, reduction)
    for name, a, t in zip(("loss", "lse"), got, truth):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_close(name, a, t, rtol=1e-6, atol=0.0)
    # d total / d logits in fp64: the terms of both gradient products
    z = (hidden.double() @ weight.double().T).requires_grad_()
    logits_fn = lambda h, w, b, y, t, r: oracle_from_logits(z, y, t, r, **opts)  # noqa: E731
    loss, lse = logits_fn(None, None, None, labels, tw.double(), reduction)
    n = labels.shape[0]
    go = torch.linspace(-1.0, 2.0, n) if reduction == "none" else torch.tensor(0.7)
    total = (loss * go.double()).sum() + (lse * torch.linspace(0.5, -1.5, n).double()).sum()
    (dz,) = torch.autograd.grad(total, z)
    u, tiny = 2.0**-11, 2.0**-24  # fp16's rounding, and its smallest step (underflow)
    h64, w64 = hidden.double().abs(), weight.double().abs()
    bound_h = u * (dz.abs() @ w64) + tiny * w64.sum(0) + u * truth[2].abs()
    bound_w = u * (dz.abs().T @ h64) + tiny * h64.sum(0) + u * truth[3].abs()
    for name, a, t, bound in (("grad_hidden", got[2], truth[2], bound_h),
                              ("grad_weight", got[3], truth[3], bound_w)):  # fmt: skip
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - t).abs()
        assert (err <= 2 * bound).all(), f"{name}: {(err / bound).max():.2f}x the bound"


def oracle_from_logits(z, y, tw, reduction, *, z_loss=0.0, **_):
    valid = y != IGNORE
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), 0.0)
    loss = (F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none") + z_loss * lse**2) * tw
    return (loss if reduction == "none" else loss.sum()), lse


# ------------------------------------------------------------------------------- the peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.interpreter
def test_bias_smoothing_z_loss_against_liger_kernel(dtype):
    """Liger-Kernel's fused linear cross-entropy with bias, label smoothing and z-loss (its
    lse_square_scale; softcap needs libdevice, which the interpreter lacks): our error against
    fp64 is at most about Liger's, on the loss and every gradient."""
    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy")
    opts = dict(bias=True, label_smoothing=0.1, z_loss=0.02)
    hidden, weight, bias, labels, _ = inputs(dtype, opts, seed=3, n=130, h=72, v=515)

    def liger_fn(h, w, b, y, tw, red):
        out = liger.LigerFusedLinearCrossEntropyFunction.apply(
            h, w, y, b, None, IGNORE, 0.02, 0.1, red, None, False, torch.float32
        )
        return (out[0] if isinstance(out, tuple) else out).float(), None

    truth = run(
        lambda h, w, b, y, t, r: (oracle(h, w, b, y, t, r, **opts)[0], None),
        hidden, weight, bias, labels, None, "mean", torch.float64,
    )  # fmt: skip
    peer = run(liger_fn, hidden, weight, bias, labels, None, "mean")
    for impl in ("torch", "triton"):
        got = run(ours(impl, **opts), hidden, weight, bias, labels, None, "mean")
        for name, a, t, p in zip(("loss", "lse", "gh", "gw", "gb"), got, truth, peer):
            if t is None:
                continue
            if dtype == torch.float32:
                assert_close(f"liger {name}", p, t, rtol=1e-4, atol=1e-4)  # the peer agrees
                assert_close(f"{impl} {name}", a, t, rtol=2e-5, atol=2e-5)
            else:
                assert_close(f"{impl} {name}", a, t, p)


# ------------------------------------------------------------------------ returned values
@pytest.mark.parametrize("impl", IMPLS)
def test_returned_lse_and_z_loss(impl):
    """return_lse: the lse of every supervised token (0 where ignored) and the z-loss part of
    the loss, reduced like it and detached."""
    hidden, weight, labels, tw = make_inputs(37, 24, 101, torch.float32, 0.4, weighted=True)
    out = fused_linear_cross_entropy(
        hidden, weight, labels, token_weights=tw, z_loss=0.5, return_lse=True,
        normalizer=10, impl=impl,
    )  # fmt: skip
    plain = fused_linear_cross_entropy(hidden, weight, labels, token_weights=tw, impl=impl)
    lse = torch.logsumexp(hidden.double() @ weight.double().T, dim=-1)
    valid = labels != IGNORE
    assert_close("lse", out.lse, torch.where(valid, lse, 0.0))
    z = (0.5 * tw.double() * lse.square())[valid].sum() / 10
    assert_close("z_loss", out.z_loss, z)
    assert_close("loss", out.loss, plain.double() / 10 + z)
    assert not out.z_loss.requires_grad


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "field,message,override",
    [
        ("bias", r"shape \(32,\)", dict(bias=torch.zeros(31))),
        ("bias", "differs from weight's", dict(bias=torch.zeros(32, dtype=torch.float64))),
        ("softcap", "positive finite", dict(softcap=0.0)),
        ("softcap", "positive finite", dict(softcap=-30.0)),
        ("label_smoothing", r"not in \[0, 1\]", dict(label_smoothing=1.5)),
        ("z_loss", ">= 0", dict(z_loss=-1e-4)),
        ("grad_filter", "label_smoothing", dict(grad_filter=True, label_smoothing=0.1)),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_options_name_the_argument(field, message, override):
    h, w, y, _ = make_inputs(8, 16, 32, torch.float32, 0.0)
    with pytest.raises(ValueError, match=message) as info:
        fused_linear_cross_entropy(h, w, y, impl="torch", **override)
    assert f"'{field}'" in str(info.value)
