"""Packing is proven by packed == unpacked per token, and by a boundary test with teeth."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssrengine import IGNORE_INDEX
from ssrengine.models import attention as A
from ssrengine.models import packing as P
from ssrengine.models.loading import hidden_and_head

ROOT = Path(__file__).resolve().parents[1]
JUNK = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "build", "*.egg-info")
needs_native = pytest.mark.skipif(
    not P.native_available(), reason="native packer not built (no compiler at install)"
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0):
    """allclose that says how far off it is and where it first goes wrong."""
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"max diff {diff.max():.3e}, mean diff {diff.mean():.3e}, {int(bad.sum())} of "
            f"{bad.numel()} elements off; first at {first}: {actual[first]} vs {expected[first]}"
        )


def make_examples(lengths: list[int], *, seed: int = 0, vocab: int = 300) -> list[tuple]:
    """(input_ids, labels) as data.encode returns them: a prompt with IGNORE_INDEX labels, then
    a target whose labels are its own tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n, (), generator=g))  # 0..n-1 prompt tokens
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


# ------------------------------------------------------------------------------ layout


def test_cu_seqlens_is_the_docstring_picture():
    cu = P.cu_seqlens([3, 2, 4])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9]
    assert P.cu_seqlens([]).tolist() == [0]


def test_packed_layout_and_shifted_labels():
    seqs = make_examples([7, 1, 12, 3, 5, 9, 2], seed=1)
    ids = [f"ex{i}" for i in range(len(seqs))]
    batches = P.pack(seqs, 16, ids=ids)
    seen = []
    for b in batches:
        cu = b.cu_seqlens.tolist()
        assert b.num_tokens == cu[-1] <= 16
        assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (b.num_tokens,)
        assert b.max_seqlen == max(np.diff(cu))
        assert b.num_targets == int((b.labels != IGNORE_INDEX).sum())
        for k, name in enumerate(b.ids):
            x, y = seqs[ids.index(name)]
            a, e = cu[k], cu[k + 1]
            assert b.input_ids[a:e].tolist() == x
            assert b.position_ids[a:e].tolist() == list(range(len(x)))
            # labels[t] is the target of position t: the next label of the same example...
            assert b.labels[a : e - 1].tolist() == y[1:]
            # ...and the last position of an example never predicts the next example's first token.
            assert b.labels[e - 1] == IGNORE_INDEX
        seen += b.ids
    assert sorted(seen) == sorted(ids)


def test_tensor_and_array_inputs_pack_like_lists():
    seqs = make_examples([7, 1, 12, 3], seed=8)
    as_tensors = [(torch.tensor(x), torch.tensor(y)) for x, y in seqs]
    as_arrays = [(np.array(x), np.array(y)) for x, y in seqs]
    for other in (as_tensors, as_arrays):
        for a, b in zip(P.pack(seqs, 16), P.pack(other, 16)):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert b.input_ids.dtype == b.labels.dtype == torch.long


def test_pack_is_deterministic_and_fills_bins():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 200, 300)]
    seqs = make_examples(lengths)
    a, b = P.pack(seqs, 256), P.pack(seqs, 256)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert sum(x.num_tokens for x in a) / (256 * len(a)) > 0.97


def test_overlong_raises_or_is_skipped_and_counted_never_cut():
    seqs = make_examples([5, 40, 8, 33])
    with pytest.raises(ValueError, match="'b' has 40 tokens > max_tokens=32"):
        P.pack(seqs, 32, ids=["a", "b", "c", "d"])
    dropped: list[str] = []
    batches = P.pack(seqs, 32, ids=["a", "b", "c", "d"], on_overlong="skip", dropped=dropped)
    assert dropped == ["b", "d"]
    assert sorted(i for b in batches for i in b.ids) == ["a", "c"]
    assert sum(b.num_tokens for b in batches) == 13  # the kept examples whole, nothing cut
    with pytest.raises(ValueError, match="on_overlong"):
        P.pack(seqs, 32, on_overlong="truncate")
    with pytest.raises(ValueError, match="same, non-zero length"):
        P.pack([([1, 2], [1])], 8)


# ------------------------------------------------------------------------------ planner


def reference_best_fit_decreasing(lengths: list[int], cap: int) -> list[list[int]]:
    """The planner's rule written the slow, obvious way: O(n * bins)."""
    visit = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    space: list[int] = []
    stamp: list[int] = []  # when each bin last changed: ties go to the most recent
    for t, i in enumerate(visit):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i] and space[b] > 0]
        if fits:
            b = min(fits, key=lambda b: (space[b], -stamp[b]))
        else:
            b = len(bins)
            bins.append([])
            space.append(cap)
            stamp.append(0)
        bins[b].append(i)
        space[b] -= lengths[i]
        stamp[b] = t
    return bins


def as_bins(plan: tuple[np.ndarray, np.ndarray]) -> list[list[int]]:
    order, offsets = plan
    return [order[a:b].tolist() for a, b in itertools.pairwise(offsets)]


lengths_and_cap = st.integers(1, 300).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=200), st.just(cap))
)


@settings(max_examples=200, deadline=None)
@given(lengths_and_cap)
def test_python_planner_follows_the_rule(case):
    lengths, cap = case
    bins = as_bins(P.plan_bins(lengths, cap, impl="python"))
    assert bins == reference_best_fit_decreasing(lengths, cap)
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= cap for load in loads)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    # Any-fit: a new bin opens only when nothing fits, so at most one bin is at most half full.
    assert sum(2 * load <= cap for load in loads) <= 1


@needs_native
@settings(max_examples=300, deadline=None)
@given(lengths_and_cap)
def test_native_planner_gives_the_same_bins(case):
    lengths, cap = case
    native = P.plan_bins(lengths, cap, impl="native")
    python = P.plan_bins(lengths, cap, impl="python")
    assert all(n.dtype == np.int64 for n in native)
    assert as_bins(native) == as_bins(python)


@needs_native
@pytest.mark.parametrize("cap", [64, 2048, 4096, 70_000])  # one, several and many bitset words
def test_native_planner_same_bins_large(cap):
    lengths = np.random.default_rng(cap).integers(1, cap + 1, 20_000)
    lengths[::7] = np.minimum(lengths[::7] // 50 + 1, cap)  # many short ones as well
    native, python = (
        P.plan_bins(lengths, cap, impl="native"),
        P.plan_bins(lengths, cap, impl="python"),
    )
    assert all(np.array_equal(n, p) for n, p in zip(native, python))


@pytest.mark.parametrize("impl", ["python", pytest.param("native", marks=needs_native)])
def test_planner_rejects_bad_lengths(impl):
    with pytest.raises(ValueError, match="item 1 has length 9, outside"):
        P.plan_bins([3, 9], 8, impl=impl)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        P.plan_bins([0], 8, impl=impl)
    order, offsets = P.plan_bins([], 8, impl=impl)
    assert order.size == 0 and offsets.tolist() == [0]


def test_python_fallback_when_the_extension_does_not_import(monkeypatch):
    seqs = make_examples([9, 4, 30, 2, 17, 11])
    expected = [b.ids for b in P.pack(seqs, 32)]
    monkeypatch.setitem(sys.modules, "ssrengine.kernels._packer", None)  # import now fails
    P._load_native.cache_clear()
    try:
        assert not P.native_available()
        assert [b.ids for b in P.pack(seqs, 32)] == expected
        with pytest.raises(RuntimeError, match="not built"):
            P.plan_bins([1], 4, impl="native")
    finally:
        monkeypatch.undo()
        P._load_native.cache_clear()


@pytest.mark.slow
def test_install_without_a_compiler_falls_back(tmp_path):
    """Build a wheel with no cmake and no C++ compiler on PATH; it installs and packs in Python."""
    src = tmp_path / "src"  # a clean copy: no built .so, no build/ of the checkout
    for name in ("ssrengine", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=JUNK)
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), CXX="/nonexistent/c++")
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps",
         "-v", "-w", str(tmp_path / "wheel")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert "native extension ssrengine.kernels._packer not built" in build.stdout + build.stderr
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    assert not any(n.endswith((".so", ".pyd")) for n in zipfile.ZipFile(wheel).namelist())
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, env=env,
    )  # fmt: skip
    # The checkout's editable install also serves ssrengine.kernels.*; take it off the path.
    probe = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        f"sys.path.insert(0, {str(target)!r}); import ssrengine.models.packing as p; "
        f"assert p.__file__.startswith({str(target)!r}), p.__file__; "
        "from ssrengine.kernels import cross_entropy as c, fused_linear_cross_entropy; "
        f"assert c.__file__.startswith({str(target)!r}), c.__file__; "
        "print(p.native_available(), len(p.pack([([1, 2, 3], [1, 2, 3])] * 5, 8)))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "3"]  # 5 x 3 tokens in bins of 8


# ------------------------------------------------------------------------------ models

# (the model's attn_implementation, model_inputs mode): "own" = model_inputs(b, attn),
# "block" = with an explicit block-diagonal mask, "any" = model_inputs(b, None), the kwargs the
# trainer's micro-batches carry (position_ids + varlen boundaries, whichever the model runs),
# "positions" = position_ids only.
# sdpa_varlen: ssrengine's CPU varlen attention (one SDPA call per example).
IMPLS = [(a, m) for a in ("sdpa", "eager") for m in ("own", "block", "any")]
IMPLS += [("sdpa_varlen", m) for m in ("own", "any", "positions")]


def inputs_for(batch: P.PackedBatch, attn: str, mode: str) -> dict:
    if mode == "positions":  # position_ids only: the attention must find the boundaries itself
        return P.model_inputs(batch, "sdpa")
    return P.model_inputs(batch, None if mode == "any" else attn, block_mask=mode == "block")


def load(path: Path, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if attn == A.SDPA_VARLEN:
        A.register_sdpa_varlen()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn
    )
    return model.train()  # dropout is 0 in these configs; train() as the trainer runs it


def token_logprobs(model, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) at every supervised position t, in order."""
    hidden, weight = hidden_and_head(model, **kwargs)
    keep = labels != IGNORE_INDEX
    logits = hidden.reshape(-1, hidden.shape[-1])[keep] @ weight.T  # (N_sup, V)
    return torch.log_softmax(logits.float(), -1).gather(1, labels[keep, None])[:, 0]


def alone(model, seq) -> tuple[torch.Tensor, dict]:
    """Per-token log-probs and gradients of one example run by itself, no packing involved."""
    x, y = seq
    labels = torch.tensor(y[1:] + [IGNORE_INDEX])
    model.zero_grad(set_to_none=True)
    lp = token_logprobs(model, {"input_ids": torch.tensor([x])}, labels)
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


def check_packed_equals_alone(
    model, seqs, max_tokens, attn, mode, *, atol, grad_rtol, reference=None
):
    batches = P.pack(seqs, max_tokens)
    assert any(len(b.ids) > 1 for b in batches), "nothing was packed together"
    reference = reference or [alone(model, s) for s in seqs]
    for b in batches:
        model.zero_grad(set_to_none=True)
        lp = token_logprobs(model, inputs_for(b, attn, mode), b.labels)
        lp.sum().backward()
        members = [int(i) for i in b.ids]
        expected = torch.cat([reference[i][0] for i in members])
        assert_close(lp.detach(), expected, atol=atol)
        for name, p in model.named_parameters():
            want = sum(reference[i][1][name] for i in members)
            scale = want.abs().max().item()
            assert_close(p.grad, want, atol=grad_rtol * scale)


@pytest.mark.parametrize(("attn", "mode"), IMPLS)
def test_packed_equals_each_example_alone_tiny(tiny_model_dir, attn, mode):
    model = load(tiny_model_dir, attn)
    seqs = make_examples([23, 1, 9, 40, 2, 17, 31, 5], seed=2)
    check_packed_equals_alone(model, seqs, 64, attn, mode, atol=2e-5, grad_rtol=2e-5)


@pytest.mark.slow
def test_packed_equals_each_example_alone_smollm2(smollm2_dir):
    model = load(smollm2_dir, "sdpa")
    seqs = make_examples([41, 3, 77, 29], seed=3, vocab=49152)
    reference = [alone(model, s) for s in seqs]
    for attn in ("sdpa", A.register_sdpa_varlen()):
        model.set_attn_implementation(attn)
        check_packed_equals_alone(
            model, seqs, 128, attn, "own", atol=2e-4, grad_rtol=1e-3, reference=reference
        )


def test_sdpa_varlen_without_boundaries_is_sdpa(tiny_model_dir):
    """A padded batch through an sdpa_varlen model: transformers' sdpa, padding mask and all."""
    seqs = make_examples([9, 4, 13], seed=7)
    ids = torch.full((3, 13), 2)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for i, (x, _) in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    outs = [
        hidden_and_head(load(tiny_model_dir, attn), input_ids=ids, attention_mask=mask)[0]
        for attn in ("sdpa", "sdpa_varlen")
    ]
    assert_close(outs[1][mask.bool()], outs[0][mask.bool()], atol=1e-6)


def test_sdpa_varlen_generates_like_sdpa(tiny_model_dir):
    """With a KV cache (generation, left padding) sdpa_varlen is transformers' sdpa."""
    prompts = [make_examples([n], seed=n)[0][0] for n in (5, 9)]
    ids = torch.full((2, 9), 2)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, x in enumerate(prompts):  # left padding, as generation pads
        ids[i, 9 - len(x) :] = torch.tensor(x)
        mask[i, 9 - len(x) :] = 1
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    greedy |= {"output_logits": True, "return_dict_in_generate": True}
    runs = {}
    for attn in ("sdpa", "sdpa_varlen"):
        model = load(tiny_model_dir, attn).eval()
        with torch.no_grad():
            padded = model.generate(input_ids=ids, attention_mask=mask, **greedy)
            # one unpadded prompt: the mask-free "full row" path, then decoding with the cache
            single = model.generate(input_ids=ids[1:], **greedy)
        runs[attn] = [torch.stack(padded.logits), torch.stack(single.logits)]
    for varlen, sdpa in zip(runs["sdpa_varlen"], runs["sdpa"]):
        assert_close(varlen, sdpa, atol=1e-5)


def cross_talk(model, batch: P.PackedBatch, kwargs: dict) -> float:
    """Largest |d hidden(example k) / d embedding(token outside example k)| over the batch.

    Exactly 0 when no token attends across a boundary: the masked attention probabilities are
    exactly 0, so no gradient path exists. Any leak, however small, makes it non-zero."""
    captured = {}
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: captured.setdefault("emb", out)
    )
    try:
        hidden, _ = hidden_and_head(model, **kwargs)  # (1, T, H)
    finally:
        hook.remove()
    emb = captured["emb"]  # (1, T, H)
    cu = batch.cu_seqlens.tolist()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in range(len(cu) - 1):
        a, e = cu[k], cu[k + 1]
        probe = torch.randn(hidden[0, a:e].shape, generator=g)
        (grad,) = torch.autograd.grad((hidden[0, a:e] * probe).sum(), emb, retain_graph=True)
        outside = torch.ones(batch.num_tokens, dtype=torch.bool)
        outside[a:e] = False
        worst = max(worst, grad[0, outside].abs().max().item())
    return worst


@pytest.mark.parametrize(("attn", "mode"), IMPLS)
def test_no_token_attends_across_a_boundary(tiny_model_dir, attn, mode):
    model = load(tiny_model_dir, attn)
    (batch,) = P.pack(make_examples([6, 11, 1, 8, 4], seed=4), 64)
    assert len(batch.ids) == 5
    assert cross_talk(model, batch, inputs_for(batch, attn, mode)) == 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_boundary_test_catches_leaks(tiny_model_dir, attn):
    """The test above has teeth: the ways packing silently goes wrong are all caught."""
    model = load(tiny_model_dir, attn)
    (batch,) = P.pack(make_examples([6, 11, 1, 8, 4], seed=4), 64)
    ids = batch.input_ids[None]
    # No position_ids: one causal sequence; every example sees the ones before it.
    assert cross_talk(model, batch, {"input_ids": ids}) > 1e-6
    # position_ids restart but a KV cache is on: transformers skips packed-sequence detection
    # (tokens then attend across examples). hidden_and_head always passes use_cache=False, so call the
    # base model directly here.
    leaky = model.base_model
    captured = {}
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: captured.setdefault("emb", out)
    )
    hidden = leaky(input_ids=ids, position_ids=batch.position_ids[None], use_cache=True)
    hook.remove()
    a = batch.cu_seqlens[1].item()
    (grad,) = torch.autograd.grad(hidden.last_hidden_state[0, a:].sum(), captured["emb"])
    assert grad[0, :a].abs().max() > 1e-6


# ------------------------------------------------------------------------------ normalization


def step_gradient(model, micro_batches: list[P.PackedBatch], attn: str) -> dict:
    """One optimizer step's gradient: summed token losses / supervised tokens of the step."""
    model.zero_grad(set_to_none=True)
    n_sup = P.step_targets(micro_batches)
    for b in micro_batches:
        hidden, weight = hidden_and_head(model, **P.model_inputs(b, attn))
        logits = hidden[0] @ weight.T  # (T, V)
        loss = F.cross_entropy(logits, b.labels, ignore_index=IGNORE_INDEX, reduction="sum")
        (loss / n_sup).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_any_packing_gives_the_same_step_gradient(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    seqs = make_examples([23, 1, 9, 40, 2, 17, 31, 5, 12, 27], seed=5)
    ids = [str(i) for i in range(len(seqs))]
    # 1 example per micro-batch (like padded batches of 1), small bins, one big bin.
    packings = {
        "alone": [P.pack_one([s], [i]) for s, i in zip(seqs, ids)],
        "bins of 48": P.pack(seqs, 48),
        "bins of 64, reversed": P.pack(seqs[::-1], 64, ids=ids[::-1]),
        "one bin": P.pack(seqs, 256),
    }
    assert [len(v) for v in packings.values()] == [10, 4, 3, 1]
    grads = {k: step_gradient(model, v, "sdpa") for k, v in packings.items()}
    ref = grads.pop("alone")
    for name, g in grads.items():
        for p in ref:
            assert_close(g[p], ref[p], atol=2e-5 * ref[p].abs().max().item()), name

    # Teeth: averaging micro-batch means (the 2024 gradient-accumulation bug) does depend on
    # the packing, so the equality above is not vacuous.
    model.zero_grad(set_to_none=True)
    mbs = packings["bins of 48"]
    for b in mbs:
        hidden, weight = hidden_and_head(model, **P.model_inputs(b, "sdpa"))
        loss = F.cross_entropy(hidden[0] @ weight.T, b.labels, ignore_index=IGNORE_INDEX)
        (loss / len(mbs)).backward()
    p = "model.layers.0.mlp.down_proj.weight"
    assert (model.get_parameter(p).grad - ref[p]).abs().max() > 1e-4 * ref[p].abs().max()


def test_trainer_micro_batches_packed_equal_padded(tiny_model_dir):
    """train.packing = true through batching.micro_batches and trainer.loss_sum: one epoch has
    the same examples, loss and gradient as padded micro-batches."""
    from ssrengine.core.config import TrainConfig
    from ssrengine.training.batching import Encoded, micro_batches
    from ssrengine.training.loss import loss_sum

    model = load(tiny_model_dir, "sdpa")
    seqs = make_examples([23, 1, 9, 40, 2, 17, 31, 5, 12, 27], seed=6)
    encoded = [Encoded(f"e{i}", x, y) for i, (x, y) in enumerate(seqs)]
    results = {}
    for packing in (True, False):
        cfg = TrainConfig(packing=packing, max_tokens=64, micro_batch_size=3)
        mbs = micro_batches(encoded, cfg, epoch=0, pad_id=2)
        assert sorted(i for mb in mbs for i in mb.ids) == sorted(e.id for e in encoded)
        assert sum(mb.real_tokens for mb in mbs) == sum(len(x) for x, _ in seqs)
        n_sup = sum(mb.supervised_tokens for mb in mbs)
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            loss = loss_sum(model, mb, "naive")
            (loss / n_sup).backward()
            total += loss.item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[packing] = (len(mbs), n_sup, total, grads)
    (n_packed, sup_p, loss_p, g_p), (n_padded, sup_q, loss_q, g_q) = results[True], results[False]
    assert (n_packed, n_padded) == (3, 4) and sup_p == sup_q
    assert abs(loss_p - loss_q) <= 1e-4 * abs(loss_q)
    for name in g_q:
        assert_close(g_p[name], g_q[name], atol=2e-5 * g_q[name].abs().max().item())


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_flash_attention_varlen_equals_alone(tiny_model_dir):
    """flash-attn varlen on the precomputed cu_seqlens: its error against an fp32 sdpa run is
    bounded by the error of a bf16 sdpa run of the same packed batch."""
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    def cuda_model(dtype, attn):
        return AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=dtype, attn_implementation=attn
        ).cuda()

    flash = cuda_model(torch.bfloat16, "flash_attention_2")
    bf16, fp32 = cuda_model(torch.bfloat16, "sdpa"), cuda_model(torch.float32, "sdpa")
    for b in P.pack(make_examples([23, 1, 9, 40, 2, 17, 31, 5], seed=2), 64):
        b = b.to("cuda")
        kw = P.model_inputs(b, "flash_attention_2")
        assert kw["cu_seq_lens_q"].dtype == torch.int32
        out = hidden_and_head(flash, **kw)[0].float()
        exact = hidden_and_head(fp32, **P.model_inputs(b, "sdpa"))[0]
        ref = hidden_and_head(bf16, **P.model_inputs(b, "sdpa"))[0].float()
        err, err_ref = (out - exact).abs().max(), (ref - exact).abs().max()
        assert err <= 2 * err_ref + 1e-3, (err, err_ref)
