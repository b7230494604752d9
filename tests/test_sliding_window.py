"""Sliding-window attention (Gemma-3) in packed rows: sdpa_varlen's causal band against
transformers' own masks, packed == unpacked per token (log-probs and gradients) on a tiny random
Gemma-3 whose examples are longer than its window, FlashAttention-2's window arguments, and
what `auto` picks for windows and attention softcapping."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from ssrengine.core.errors import InputError
from ssrengine.models import attention as A
from ssrengine.models import packing as P
from ssrengine.models.loading import hidden_and_head, load_model
from tests.test_packing import (
    alone,
    assert_close,
    check_packed_equals_alone,
    inputs_for,
    make_examples,
)
from tests.tiny import tiny_gemma3_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
WINDOW = 4  # the tiny Gemma-3's (tests/tiny.py): every example below but two is longer
LENGTHS = [23, 1, 9, 40, 2, 17, 31, 5]


def load(path, attn: str) -> torch.nn.Module:
    if attn == A.SDPA_VARLEN:
        A.register_sdpa_varlen()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn
    )
    return model.train()


@functools.cache
def _reference(path) -> list:
    """Each example alone through transformers' eager attention (its own sliding mask)."""
    model = load(path, "eager")
    seqs = make_examples(LENGTHS, seed=2, vocab=model.config.vocab_size)
    return [alone(model, s) for s in seqs]


# ------------------------------------------------------------------ the band, one layer
@pytest.mark.parametrize("window", [1, 3, 4, 9])
def test_causal_band_is_transformers_sliding_window_mask(window):
    """The off-by-one: query i sees keys i - window + 1 .. i, as transformers' mask function
    (masking_utils.sliding_window_causal_mask_function) says."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    n = 12
    fn = sliding_window_causal_mask_function(window)
    i = torch.arange(n)
    want = fn(0, 0, i[:, None], i[None, :])  # (query, key), as sdpa_mask evaluates it
    band = A.causal_band(n, window)
    assert torch.equal(band, want)
    assert band.sum(1).tolist() == [min(i + 1, window) for i in range(n)]


def _layer_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, 8, generator=g).requires_grad_()
    k = torch.randn(1, 2, n, 8, generator=g).requires_grad_()
    v = torch.randn(1, 2, n, 8, generator=g).requires_grad_()
    return q, k, v


def test_packed_layer_equals_eager_with_transformers_mask_and_sees_no_further():
    """sdpa_varlen on a packed row of three examples (7, 2, 11 tokens; window 3) equals
    transformers' eager attention under its own sliding mask, example by example; and a query
    has exactly zero gradient on every key outside its window or its example."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    window, bounds = 3, (0, 7, 9, 20)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training, module.is_causal = 2, False, True
    q, k, v = _layer_inputs(bounds[-1])
    out, _ = A.sdpa_varlen_attention(
        module, q, k, v, None, scaling=0.5, cu_seq_lens_host=bounds, sliding_window=window
    )
    for a, b in itertools.pairwise(bounds):
        n = b - a
        mask = sdpa_mask(
            batch_size=1,
            q_length=n,
            kv_length=n,
            mask_function=sliding_window_causal_mask_function(window),
            allow_is_causal_skip=False,
        )
        want, _ = eager_attention_forward(
            module,
            *(t[:, :, a:b] for t in (q, k, v)),
            torch.where(mask, 0.0, torch.finfo(torch.float32).min),
            scaling=0.5,
        )
        assert_close(out[:, a:b], want, atol=1e-6)
    i = 15  # the 7th token of the third example
    (dk,) = torch.autograd.grad(out[0, i].sum(), k)
    seen = dk[0].abs().sum((0, 2)) != 0
    assert seen.nonzero().flatten().tolist() == [i - 2, i - 1, i]


# ----------------------------------------------------------- the tiny Gemma-3, packed
# sdpa/eager: transformers' masks from the position restarts; no "block" mode: an explicit 4D
# mask is used as-is for every layer (masking_utils._preprocess_mask_arguments), window or not.
GEMMA_IMPLS = [(a, m) for a in ("sdpa", "eager") for m in ("own", "any")]
GEMMA_IMPLS += [("sdpa_varlen", m) for m in ("own", "any", "positions")]


@pytest.mark.parametrize(("attn", "mode"), GEMMA_IMPLS)
def test_packed_equals_each_example_alone_gemma3(tiny_gemma3_dir, attn, mode):
    model = load(tiny_gemma3_dir, attn)
    assert model.config.sliding_window == WINDOW
    assert sorted(set(model.config.layer_types)) == ["full_attention", "sliding_attention"]
    seqs = make_examples(LENGTHS, seed=2, vocab=model.config.vocab_size)
    check_packed_equals_alone(
        model, seqs, 64, attn, mode, atol=2e-5, grad_rtol=2e-5,
        reference=_reference(tiny_gemma3_dir),
    )  # fmt: skip


def test_the_window_changes_the_result(tiny_gemma3_dir):
    """The comparison above has teeth: without the window the log-probs of an example longer
    than it differ from transformers' (and agree on an example within it)."""
    model = load(tiny_gemma3_dir, "eager")
    model.config.sliding_window = 4096  # every layer full attention in effect
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    seqs = make_examples(LENGTHS, seed=2, vocab=model.config.vocab_size)
    ref = _reference(tiny_gemma3_dir)
    long_, short = LENGTHS.index(40), LENGTHS.index(2)
    assert (alone(model, seqs[long_])[0] - ref[long_][0]).abs().max() > 1e-3
    assert_close(alone(model, seqs[short])[0], ref[short][0], atol=1e-6)


def test_sdpa_varlen_generates_like_eager_gemma3(tiny_gemma3_dir):
    """Generation at batch size 1 (the mask-free full row, then decoding with the sliding
    cache) and in a left-padded batch, prompts longer than the window: same logits as eager."""
    prompts = [make_examples([n], seed=n, vocab=300)[0][0] for n in (7, 13)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, 13 - len(x) :] = torch.tensor(x)
        mask[i, 13 - len(x) :] = 1
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    greedy |= {"output_logits": True, "return_dict_in_generate": True}
    runs = {}
    for attn in ("eager", "sdpa_varlen"):
        model = load(tiny_gemma3_dir, attn).eval()
        with torch.no_grad():
            padded = model.generate(input_ids=ids, attention_mask=mask, **greedy)
            single = model.generate(input_ids=ids[1:], **greedy)
        runs[attn] = [torch.stack(padded.logits), torch.stack(single.logits)]
    for varlen, eager in zip(runs["sdpa_varlen"], runs["eager"]):
        assert_close(varlen, eager, atol=1e-5)


# ------------------------------------------------- FlashAttention-2's window, on the CPU
def fake_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, block_table=None, calls=None,
):  # fmt: skip
    """flash_attn.flash_attn_varlen_func's signature (flash-attn 2.6+) and documented
    semantics, in torch: query i of a sequence attends to keys in [i - window_size[0],
    i + window_size[1]] inclusive (-1: unbounded), and to none after i when causal
    (flash_attn/flash_attn_interface.py, its docstring)."""
    calls.append({"window_size": tuple(window_size), "causal": causal})
    cu = cu_seqlens_q.tolist()
    assert cu == cu_seqlens_k.tolist()
    out = []
    for a, b in itertools.pairwise(cu):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = (qs @ ks.transpose(1, 2)) * softmax_scale
        i = torch.arange(b - a)
        rel = i[None, :] - i[:, None]  # key - query
        ok = torch.ones_like(rel, dtype=torch.bool)
        left, right = window_size
        if left >= 0:
            ok &= rel >= -left
        if right >= 0:
            ok &= rel <= right
        if causal:
            ok &= rel <= 0
        out.append((scores.masked_fill(~ok, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


def test_flash_attention_2_gets_the_window_of_each_layer(tiny_gemma3_dir, monkeypatch):
    """The FA2 path of a packed Gemma-3 row (our varlen kwargs, transformers' flash
    integration, a stand-in for flash-attn's varlen kernel with its documented semantics):
    sliding layers get window_size (window - 1, window - 1) with causal, i.e. (window - 1, 0):
    query i sees keys i - window + 1 .. i, as transformers' mask; full layers get no window;
    the per-token log-probs and gradients equal each example alone under eager."""
    import transformers.modeling_flash_attention_utils as fa

    calls: list[dict] = []
    varlen = functools.partial(fake_flash_attn_varlen_func, calls=calls)
    functools.update_wrapper(varlen, fake_flash_attn_varlen_func)
    process = fa._lazy_define_process_function(fake_flash_attn_varlen_func)
    stub = ((None, varlen, None, None, None), (process, dict))
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: stub)
    model = load(tiny_gemma3_dir, "eager")
    model.config._attn_implementation = "flash_attention_2"
    seqs = make_examples(LENGTHS, seed=2, vocab=model.config.vocab_size)
    check_packed_equals_alone(
        model, seqs, 64, "flash_attention_2", "own", atol=2e-5, grad_rtol=2e-5,
        reference=_reference(tiny_gemma3_dir),
    )  # fmt: skip
    types = model.config.layer_types
    per_layer = calls[: len(types)]  # the first forward, layer by layer
    want = [
        {"window_size": (WINDOW - 1, WINDOW - 1), "causal": True}
        if t == "sliding_attention"
        else {"window_size": (-1, -1), "causal": True}
        for t in types
    ]
    assert per_layer == want


@pytest.mark.gpu
def test_flash_attention_2_packed_equals_sdpa_varlen_gemma3(tiny_gemma3_dir):
    """On a GPU with flash-attn: the tiny Gemma-3 packed through real FlashAttention-2
    (window_size from transformers) gives sdpa_varlen's per-token log-probs, bf16 autocast."""
    pytest.importorskip("flash_attn")
    from tests.test_packing import token_logprobs

    seqs = make_examples(LENGTHS, seed=2, vocab=300)
    (batch,) = P.pack(seqs, sum(len(x) for x, _ in seqs))
    batch = batch.to("cuda")
    out = {}
    for attn in ("flash_attention_2", "sdpa_varlen"):
        model = load_model(
            str(tiny_gemma3_dir), device="cuda", attn_implementation=attn, autocast="bfloat16"
        )
        assert model.config._attn_implementation == attn
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out[attn] = token_logprobs(model, inputs_for(batch, attn, "own"), batch.labels)
    assert_close(out["flash_attention_2"].float(), out["sdpa_varlen"].float(), atol=5e-2)


# ------------------------------------------------------------- what auto picks, and why
@pytest.fixture
def flash(monkeypatch):
    """flash-attn "installed", its varlen function taking the arguments given."""

    def install(*params: str) -> None:
        monkeypatch.setattr(A, "_flash_attn_installed", lambda: True)
        monkeypatch.setattr(A, "_flash_varlen_params", lambda: frozenset(params))

    return install


def gemma2(**overrides):
    from transformers import Gemma2Config

    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=None)  # fmt: skip
    return Gemma2Config(**{**fields, **overrides})


def pick(requested, device, config, weights="bfloat16"):
    return A.pick_attn_implementation(requested, device, weights=weights, config=config)


def test_auto_for_sliding_windows(flash):
    g3 = tiny_gemma3_config(64)
    flash("window_size", "softcap")
    assert pick("auto", CUDA, g3) == "flash_attention_2"
    assert pick("auto", CPU, g3) == "sdpa_varlen"
    assert pick("auto", CUDA, g3, weights="float32") == "sdpa_varlen"
    flash()  # a flash-attn without window_size: transformers would drop the window silently
    assert pick("auto", CUDA, g3) == "sdpa_varlen"
    with pytest.raises(InputError, match=r"^field 'model.attn_implementation': .*window_size"):
        pick("flash_attention_2", CUDA, g3)


def test_auto_for_attention_softcapping(flash):
    capped = gemma2()
    flash("window_size", "softcap")
    assert pick("auto", CUDA, capped) == "flash_attention_2"
    flash("window_size")
    assert pick("auto", CUDA, capped) == "eager"
    assert pick("auto", CPU, capped) == "eager"
    for explicit in ("sdpa_varlen", "sdpa"):
        with pytest.raises(InputError) as e:
            pick(explicit, CPU, capped)
        assert str(e.value).startswith("field 'model.attn_implementation': ")
        assert "attn_logit_softcapping = 50" in str(e.value) and "\n" not in str(e.value)
    # Gemma-3 declares attn_logit_softcapping = None: nothing to cap
    assert pick("auto", CPU, tiny_gemma3_config(64)) == "sdpa_varlen"


def test_auto_skips_flash_for_a_head_dim_it_cannot_run(flash):
    flash("window_size", "softcap")
    big = tiny_gemma3_config(64, head_dim=512)
    assert pick("auto", CUDA, big) == "sdpa_varlen"
    with pytest.raises(InputError, match="head_dim 512 > 256"):
        pick("flash_attention_2", CUDA, big)


def test_auto_softcapped_model_runs_packed(tmp_path):
    """A tiny Gemma-2 (attention softcapping 50) under `auto` on the CPU: eager, and packed
    rows still equal each example alone (the softcap is applied, the window too)."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(0)
    Gemma2ForCausalLM(gemma2(vocab_size=300)).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu").train()
    assert model.config._attn_implementation == "eager"
    seqs = make_examples([11, 3, 9, 14], seed=5)
    check_packed_equals_alone(model, seqs, 64, "eager", "any", atol=2e-5, grad_rtol=2e-5)


def test_hidden_and_head_of_gemma3_are_its_logits(tiny_gemma3_dir):
    """Gemma-3's scaled embeddings and tied head: hidden @ weight.T is the model's own logits."""
    model = load(tiny_gemma3_dir, "sdpa_varlen").eval()
    ids = torch.tensor([make_examples([12], seed=1)[0][0]])
    with torch.no_grad():
        hidden, weight = hidden_and_head(model, input_ids=ids)
        want = model(input_ids=ids).logits
    assert_close(hidden @ weight.T, want, atol=1e-5)
