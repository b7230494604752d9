"""Fused masked linear cross-entropy: both paths against an fp64 oracle.

Every comparison is against fp64 computed from the same (rounded) inputs; the error of a kernel
in fp16/bf16 is bounded by the error of naive torch in that dtype (`F.cross_entropy(h @ W.T)`),
fixed tolerances are used only in fp32. The Triton kernels run in the interpreter
(TRITON_INTERPRET=1, set by conftest.py) with the large tiles it needs to be fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssrengine.kernels.cross_entropy import torch_linear_cross_entropy
from ssrengine.kernels.triton_cross_entropy import KernelConfig, triton_linear_cross_entropy

from ssrengine.kernels import cross_entropy as CE
from ssrengine.kernels import fused_linear_cross_entropy, sequence_log_likelihood
from ssrengine.kernels import torch_cross_entropy as TCE

IGNORE = -100
# The Triton path on CPU tensors runs in the interpreter (skipped on a GPU node, see conftest).
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)
IMPLS = ["torch", TRITON]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 24, 101), (130, 72, 515)]  # ragged, non-power-of-two (N, H, V)
IGNORED = [0.0, 0.6, 1.0]
REDUCTIONS = ["sum", "mean", "none"]


# ------------------------------------------------------------------------------- helpers
def make_inputs(n, h, v, dtype, ignored=0.6, weighted=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h**0.5)  # logits with std ~2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: round(ignored * n)]] = IGNORE
    tw = torch.rand(n, generator=g).to(device) * 2 if weighted else None
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device), tw


def naive(hidden, weight, labels, tw=None, reduction="sum"):
    """The baseline: full logits, F.cross_entropy, in the dtype of the inputs."""
    loss = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="none")
    if tw is not None:
        loss = loss * tw.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "mean":
        valid = labels != IGNORE
        denom = valid.sum().to(total.dtype) if tw is None else tw.to(total.dtype)[valid].sum()
        total = total / torch.where(denom > 0, denom, 1)
    return total


def loss_and_grads(fn, hidden, weight, labels, tw, reduction, dtype=None):
    """Run fn on leaf copies (optionally cast to dtype); return (loss, grad_hidden, grad_weight)
    for a fixed upstream gradient."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    t = None if tw is None else tw.to(torch.float64 if dtype == torch.float64 else tw.dtype)
    out = fn(h, w, labels, t, reduction)
    if reduction == "none":
        go = torch.linspace(-1.0, 2.0, labels.shape[0], dtype=out.dtype, device=out.device)
    else:
        go = torch.tensor(0.7, dtype=out.dtype, device=out.device)
    gh, gw = torch.autograd.grad(out, (h, w), go, allow_unused=True)
    zeros = torch.zeros_like
    return out.detach(), (zeros(h) if gh is None else gh), (zeros(w) if gw is None else gw)


def assert_close(name, actual, truth, ref=None, *, rtol=1e-5, atol=1e-5, tol=1e-6):
    """fp32 (ref=None): |actual - truth| <= atol + rtol * |truth| elementwise.
    Otherwise: max|actual - truth| <= 2 * max|ref - truth| + tol * (1 + max|truth|)."""
    actual, truth = actual.double(), truth.double()
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    err = (actual - truth).abs()
    err_ref = None
    if ref is None:
        bad = ~(err <= atol + rtol * truth.abs())
    else:
        err_ref = (ref.double() - truth).abs().max().item() if truth.numel() else 0.0
        bound = 2 * err_ref + tol * (1 + (truth.abs().max().item() if truth.numel() else 0.0))
        bad = ~(err <= bound)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0]) if err.dim() else ()
        raise AssertionError(
            f"{name}: max diff {err.max().item():.3e}, mean diff {err.mean().item():.3e}, "
            f"naive same-dtype max diff {err_ref}, first mismatch at {first}: "
            f"{actual[first].item()} vs {truth[first].item()}"
        )


def kernel_fn(impl, **kw):
    def fn(h, w, y, tw, reduction):
        return fused_linear_cross_entropy(
            h, w, y, token_weights=tw, reduction=reduction, impl=impl, **kw
        )

    return fn


def check_against_oracle(fn, hidden, weight, labels, tw, reduction, dtype):
    truth = loss_and_grads(naive, hidden, weight, labels, tw, reduction, dtype=torch.float64)
    got = loss_and_grads(fn, hidden, weight, labels, tw, reduction)
    ref = None
    if dtype != torch.float32:
        ref = loss_and_grads(naive, hidden, weight, labels, tw, reduction)
    for name, a, t, r in zip(("loss", "grad_hidden", "grad_weight"), got, truth, ref or [None] * 3):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_close(name, a, t, r)
    if reduction == "none":
        assert (got[0][labels == IGNORE] == 0).all(), "ignored tokens must have loss 0"


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignored", IGNORED, ids=lambda r: f"ignored{int(r * 100)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_fp64(impl, dtype, ignored, weighted, reduction):
    hidden, weight, labels, tw = make_inputs(*SHAPES[0], dtype, ignored, weighted)
    check_against_oracle(kernel_fn(impl), hidden, weight, labels, tw, reduction, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_fp64_larger(impl, dtype, reduction):
    """Several row blocks in the interpreter; 60% ignored, weighted (the SSR case)."""
    hidden, weight, labels, tw = make_inputs(*SHAPES[1], dtype, 0.6, weighted=True, seed=5)
    check_against_oracle(kernel_fn(impl), hidden, weight, labels, tw, reduction, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.interpreter
def test_triton_small_tiles(dtype, reduction):
    """Many vocabulary tiles, 3 vocabulary splits, several row blocks: the online log-sum-exp,
    the split merge and the atomic accumulation across tiles."""
    cfg = KernelConfig(block_n=16, block_v=32, block_d=16, splits=3)

    def fn(h, w, y, tw, red):
        return triton_linear_cross_entropy(h, w, y, tw, IGNORE, red == "none", cfg)

    hidden, weight, labels, tw = make_inputs(77, 40, 301, dtype, 0.6, weighted=True, seed=1)
    check_against_oracle(fn, hidden, weight, labels, tw, reduction, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_many_chunks(dtype, reduction):
    def fn(h, w, y, tw, red):
        return torch_linear_cross_entropy(h, w, y, tw, IGNORE, red == "none", chunk_rows=8)

    hidden, weight, labels, tw = make_inputs(77, 40, 301, dtype, 0.6, weighted=True, seed=2)
    check_against_oracle(fn, hidden, weight, labels, tw, reduction, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_hidden_and_one_gradient(impl):
    """hidden as a strided view; a frozen lm_head (LoRA) gets no gradient and costs none."""
    big, weight, labels, _ = make_inputs(50, 66, 203, torch.float32)
    hidden = big[:, 1:64:2]  # (50, 32), stride (66, 2)
    weight = weight[:, :32].contiguous()
    check_against_oracle(kernel_fn(impl), hidden, weight, labels, None, "sum", torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, impl=impl)
    (gh,) = torch.autograd.grad(loss, h)
    truth = torch.autograd.grad(naive(h.double(), weight.double(), labels), h)[0]
    assert_close("grad_hidden (weight frozen)", gh, truth)


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [0, 23], ids=["empty", "all_ignored"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_supervised_is_zero_not_nan(impl, n, reduction):
    hidden, weight, labels, tw = make_inputs(n, 24, 101, torch.float32, 1.0, weighted=True)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, token_weights=tw, reduction=reduction,
                                      impl=impl, normalizer=None if reduction == "mean" else 0)  # fmt: skip
    assert loss.shape == ((n,) if reduction == "none" else ())
    assert (loss == 0).all()
    loss.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_normalizer_gives_the_step_mean(impl):
    """The trainer's recipe: per micro-batch reduction="sum" divided by the supervised-token
    count of the whole step equals one "mean" over the concatenated step."""
    hidden, weight, labels, _ = make_inputs(90, 24, 101, torch.float32, 0.6)
    parts = [slice(0, 17), slice(17, 60), slice(60, 90)]  # unequal micro-batches
    step_tokens = (labels != IGNORE).sum()  # counted before the step, on the device
    w = weight.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    total = 0.0
    for p in parts:
        loss = fused_linear_cross_entropy(h[p], w, labels[p], normalizer=step_tokens, impl=impl)
        loss.backward()
        total += loss.item()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    mean = fused_linear_cross_entropy(h1, w1, labels, reduction="mean", impl=impl)
    mean.backward()
    assert_close("loss", torch.tensor(total), mean.detach())
    assert_close("grad_hidden", h.grad, h1.grad)
    assert_close("grad_weight", w.grad, w1.grad)
    as_float = fused_linear_cross_entropy(hidden, weight, labels, normalizer=7, impl=impl)
    assert_close("float normalizer", as_float * 7, naive(hidden, weight, labels))


def _bad_inputs():
    h, w, y, _ = make_inputs(8, 16, 32, torch.float32, 0.0)
    y_bad = y.clone()
    y_bad[5] = 32
    tw_neg = torch.ones(8)
    tw_neg[3] = -0.5
    meta = torch.empty(8, device="meta", dtype=torch.long)
    return [
        ("hidden", "2-D", dict(hidden=h[0])),
        ("weight", r"does not match hidden size H=16", dict(weight=w[:, :15])),
        ("labels", "has 7 entries", dict(labels=y[:7])),
        ("labels", "not an integer dtype", dict(labels=y.float())),
        ("weight", "differs from hidden's torch.float32", dict(weight=w.double())),
        ("hidden", "is not float32", dict(hidden=h.double(), weight=w.double())),
        ("labels", r"is on meta", dict(labels=meta)),
        ("labels", r"labels\[5\] = 32 is outside \[0, 32\)", dict(labels=y_bad)),
        ("token_weights", r"token_weights\[3\] = -0.5", dict(token_weights=tw_neg)),
        ("token_weights", "shape", dict(token_weights=torch.ones(7))),
        ("reduction", "'avg'", dict(reduction="avg")),
        ("impl", "'cuda'", dict(impl="cuda")),
        ("normalizer", "reduction='mean'", dict(normalizer=3, reduction="mean")),
        ("normalizer", "negative", dict(normalizer=-1.0)),
    ], (h, w, y)


_CASES, _GOOD = _bad_inputs()


@pytest.mark.parametrize("field,message,override", _CASES, ids=[c[1][:24] for c in _CASES])
def test_bad_input_names_the_argument(field, message, override):
    h, w, y = _GOOD
    args = dict(hidden=h, weight=w, labels=y) | override
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    with pytest.raises(ValueError, match=message) as info:
        fused_linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)
    assert f"'{field}'" in str(info.value)


# --------------------------------------------------------------------------- peer, scorer
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.interpreter
def test_against_liger_kernel(dtype, reduction):
    """Liger-Kernel's fused linear cross-entropy (run in the interpreter) as a peer: our error
    against fp64 is at most about Liger's."""
    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy")

    def liger_fn(h, w, y, tw, red):
        out = liger.LigerFusedLinearCrossEntropyFunction.apply(
            h, w, y, None, None, IGNORE, 0.0, 0.0, red, None, False, torch.float32
        )
        return (out[0] if isinstance(out, tuple) else out).float()

    hidden, weight, labels, _ = make_inputs(130, 72, 515, dtype, 0.6, seed=3)
    truth = loss_and_grads(naive, hidden, weight, labels, None, reduction, dtype=torch.float64)
    peer = loss_and_grads(liger_fn, hidden, weight, labels, None, reduction)
    ours = loss_and_grads(kernel_fn("triton"), hidden, weight, labels, None, reduction)
    for name, a, t, p in zip(("loss", "grad_hidden", "grad_weight"), ours, truth, peer):
        if dtype == torch.float32:
            assert_close(f"liger {name}", p, t, rtol=1e-4, atol=1e-4)  # the peer agrees
            assert_close(name, a, t)
        else:
            assert_close(name, a, t, p)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_log_likelihood(impl):
    hidden, weight, labels, _ = make_inputs(60, 24, 101, torch.float32, 0.0, seed=4)
    cu = torch.tensor([0, 25, 25, 41, 60], dtype=torch.int32)  # one empty sequence
    labels[[0, 1, 2, 24, 25, 26, 59]] = IGNORE  # prompts and sequence ends
    scores = sequence_log_likelihood(hidden, weight, labels, cu, impl=impl)
    logp = -naive(hidden.double(), weight.double(), labels, reduction="none")
    assert_close("token_logprobs", scores.token_logprobs, logp)
    for s in range(4):
        a, b = int(cu[s]), int(cu[s + 1])
        assert_close(f"sum of sequence {s}", scores.logprob_sum[s], logp[a:b].sum())
        assert int(scores.num_tokens[s]) == int((labels[a:b] != IGNORE).sum())
    assert scores.logprob_mean[1] == 0  # empty sequence
    assert not scores.token_logprobs.requires_grad
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_log_likelihood(hidden, weight, labels, torch.tensor([0, 30]), impl=impl)


@pytest.mark.interpreter
def test_triton_path_under_torch_compile():
    """The Triton path compiles as one graph: its launchers are opaque custom ops, compaction
    and the token count stay on the device (no host sync, hence no graph break)."""
    hidden, weight, labels, tw = make_inputs(77, 40, 301, torch.float32, 0.6, weighted=True)

    def step(h, w, y, t, norm):
        return fused_linear_cross_entropy(
            h, w, y, token_weights=t, normalizer=norm, impl="triton", validate=False
        )

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    norm = (labels != IGNORE).sum()
    got = loss_and_grads(lambda h, w, y, t, _: compiled(h, w, y, t, norm), hidden, weight,
                         labels, tw, "sum")  # fmt: skip
    want = loss_and_grads(lambda h, w, y, t, _: step(h, w, y, t, norm), hidden, weight,
                          labels, tw, "sum")  # fmt: skip
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        assert_close(name, a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ GPU only
# conftest leaves TRITON_INTERPRET unset where CUDA is present: these run compiled kernels.
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gpu_real_tiles(dtype, reduction):
    """Compiled kernels at a shape with many row blocks, vocabulary tiles and splits."""
    hidden, weight, labels, tw = make_inputs(2000, 576, 49_157, dtype, 0.6, True, device="cuda")
    check_against_oracle(kernel_fn("triton"), hidden, weight, labels, tw, reduction, dtype)


@pytest.mark.gpu
def test_triton_gpu_inductor_fullgraph():
    dtype = torch.bfloat16
    hidden, weight, labels, tw = make_inputs(1000, 256, 32_000, dtype, 0.6, True, device="cuda")

    @torch.compile(fullgraph=True)
    def step(h, w, y, t, reduction):
        return fused_linear_cross_entropy(h, w, y, token_weights=t, validate=False)

    check_against_oracle(step, hidden, weight, labels, tw, "sum", dtype)


@pytest.mark.gpu
def test_triton_gpu_no_host_sync():
    """The hot path (validate=False, device normalizer) never makes the CPU wait for the GPU."""
    hidden, weight, labels, tw = make_inputs(1000, 256, 32_000, torch.bfloat16, 0.6, True,
                                             device="cuda")  # fmt: skip
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    step_tokens = (labels != IGNORE).sum()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_cross_entropy(
            h, w, labels, token_weights=tw, normalizer=step_tokens, validate=False
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and h.grad is not None and w.grad is not None


# ------------------------------------------------------------------ gradient filtering
def _filtered(impl, eps):
    """The loss with gradient filtering at ``eps`` (0: off), with tiles small enough that a
    515-token vocabulary has many (the interpreter's default is one tile) and few rows each."""
    cfg = KernelConfig(block_n=16, block_v=32, block_d=16)

    def fn(h, w, y, tw, red):
        if impl == "triton":
            return triton_linear_cross_entropy(h, w, y, tw, IGNORE, red == "none", cfg, eps)
        return torch_linear_cross_entropy(h, w, y, tw, IGNORE, red == "none", 8, eps)

    return fn


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_grad_filter_error_is_bounded_by_the_same_dtype_reference(
    impl, dtype, reduction, monkeypatch
):
    """Skipped tiles (softmax below the dtype's eps / 32) leave the loss as it was and the
    gradients within the error bound of naive torch in the same dtype; and tiles were skipped."""
    monkeypatch.setattr(TCE, "FILTER_TILE", 32)
    hidden, weight, labels, tw = make_inputs(130, 72, 515, dtype, 0.6, weighted=True, seed=3)
    weight = weight * 8  # logits with std ~16: a peaked softmax, most of the vocabulary ~0
    eps = CE.filter_eps_for(dtype)
    check_against_oracle(_filtered(impl, eps), hidden, weight, labels, tw, reduction, dtype)
    on = loss_and_grads(_filtered(impl, eps), hidden, weight, labels, tw, reduction)
    off = loss_and_grads(_filtered(impl, 0.0), hidden, weight, labels, tw, reduction)
    assert torch.equal(on[0], off[0])
    assert not torch.equal(on[2], off[2]), "no tile was skipped: the test shows nothing"


def test_grad_filter_threshold_by_dtype():
    assert CE.filter_eps_for(torch.bfloat16) == 2.0**-12
    assert CE.filter_eps_for(torch.float16) == 2.0**-15
    assert CE.filter_eps_for(torch.float32) == 2.0**-28


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_grad_filter_through_the_public_function(impl, dtype, monkeypatch):
    """fp32 (threshold 2^-28) keeps the fixed fp32 tolerances."""
    monkeypatch.setattr(TCE, "FILTER_TILE", 32)
    hidden, weight, labels, tw = make_inputs(*SHAPES[1], dtype, 0.6, weighted=True)
    fn = kernel_fn(impl, grad_filter=True)
    check_against_oracle(fn, hidden, weight, labels, tw, "sum", dtype)
