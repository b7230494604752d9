"""No host sync in the packed forward+backward of the GPU training path, checked on the CPU.

On CUDA, reading a device tensor back to the host (`.item()`, `.tolist()`, `bool()`, `int()`,
`float()`) makes the CPU wait for every queued kernel: in a layer, that stalls the launch
queue once per layer. `SyncDetector` counts those calls (by the code that made them) while a
packed micro-batch runs forward and backward as it does on a GPU (sdpa_varlen attention, the
Triton loss without validation), the CPU standing in for the device: the torch analogue is
`torch.cuda.set_sync_debug_mode`, which needs a GPU.
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ssrengine.kernels import fused_linear_cross_entropy
from ssrengine.models.loading import hidden_and_head, load_model
from ssrengine.models.packing import pack
from ssrengine.training.batching import packed_micro_batch

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
HERE = Path(__file__).resolve()


@contextmanager
def sync_detector():
    """Counter of (file, function) -> host reads of tensors made inside the block."""
    seen: Counter = Counter()
    real = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def wrap(name):
        def reading(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            if Path(frame.filename).resolve() != HERE:
                seen[(Path(frame.filename).name, frame.name)] += 1
            return real[name](self, *args, **kwargs)

        return reading

    for name in SYNCS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield seen
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


def _packed_micro_batch(lengths: list[int]):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        seqs.append((ids, [-100] * (n // 2) + ids[n // 2 :]))
    [batch] = pack(seqs, sum(lengths))
    return packed_micro_batch(batch)


@pytest.mark.interpreter
def test_packed_forward_backward_reads_nothing_back(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert model.config._attn_implementation == "sdpa_varlen"
    mb = _packed_micro_batch([7, 12, 5, 9])
    forwards = 2
    with sync_detector() as syncs:
        for _ in range(forwards):
            hidden, weight = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
            loss = fused_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), weight, mb.labels.reshape(-1),
                impl="triton", validate=False,
            )  # fmt: skip
            loss.backward()
    # None at all: not ours, not per layer, and not transformers' packed-sequence detection
    # in create_causal_mask (attention.no_mask_building skips it for packed rows).
    assert not syncs, f"host reads during packed forward+backward: {dict(syncs)}"


def test_checkpointed_layers_recompute_with_the_packed_bounds(tiny_model_dir):
    """Under gradient checkpointing the backward recomputes each layer outside the forward's
    `packed_bounds`: `trainer.enable_checkpointing` re-enters it there (else the attention
    would read the boundaries back from position_ids, a sync per layer on a GPU). Same
    gradients as without checkpointing."""
    from ssrengine.training.net import enable_checkpointing

    mb = _packed_micro_batch([7, 12, 5, 9])
    grads, counts = [], []
    for checkpointing in (False, True):
        model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
        model.train()
        if checkpointing:
            enable_checkpointing(model)
        with sync_detector() as syncs:
            hidden, _ = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
            hidden.square().sum().backward()
        counts.append(dict(syncs))
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert counts == [{}, {}]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_skipping_mask_building_changes_nothing_but_the_sync(tiny_model_dir):
    """The same packed row with transformers building its mask (and reading the packed
    detection back: the sync) gives bit-identical hidden states and gradients, and the model
    keeps its attention implementation afterwards."""
    from ssrengine.models import attention

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    mb = _packed_micro_batch([7, 12, 5, 9])
    results = []
    for skip in (True, False):
        model.zero_grad(set_to_none=True)
        with sync_detector() as syncs:
            if skip:
                hidden, _ = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
            else:
                hidden = model.base_model(input_ids=mb.input_ids, use_cache=False,
                                          **mb.model_kwargs).last_hidden_state  # fmt: skip
        hidden.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((hidden.detach(), grads, sum(syncs.values())))
        assert model.config._attn_implementation == "sdpa_varlen"
    (h_skip, g_skip, n_skip), (h_mask, g_mask, n_mask) = results
    assert (n_skip, n_mask) == (0, 1)  # transformers' detection: the one read it costs
    assert torch.equal(h_skip, h_mask)
    assert all(torch.equal(a, b) for a, b in zip(g_skip, g_mask, strict=True))
    # Padded batches and non-varlen attention still build their masks.
    assert attention.skips_mask_building("sdpa_varlen", mb.model_kwargs)
    assert attention.skips_mask_building("flash_attention_2", mb.model_kwargs)
    assert not attention.skips_mask_building("sdpa", mb.model_kwargs)
    assert not attention.skips_mask_building("eager", mb.model_kwargs)
    padded = {"attention_mask": torch.ones(1, 4), **mb.model_kwargs}
    assert not attention.skips_mask_building("sdpa_varlen", padded)
    no_bounds = {k: v for k, v in mb.model_kwargs.items() if k != attention.HOST_BOUNDS}
    assert not attention.skips_mask_building("sdpa_varlen", no_bounds)


def test_packed_layers_see_no_boundaries(tiny_model_dir):
    """Under sdpa_varlen the decoder layers get a packed row's boundaries from
    `attention.packed_bounds`, not as kwargs: a compiled layer (train.compile) would guard on
    host ints and on the lengths of cu_seq_lens, one recompile per packing."""
    from ssrengine.models import attention
    from ssrengine.models.layers import decoder_layers

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    mb = _packed_micro_batch([7, 12, 5, 9])
    seen: list[set[str]] = []
    hook = decoder_layers(model)[1].register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(set(kw)), with_kwargs=True
    )
    hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
    hook.remove()
    assert attention.HOST_BOUNDS in mb.model_kwargs  # the batch carries them ...
    assert set(attention.VARLEN_KWARGS) <= set(mb.model_kwargs)
    assert len(seen) == 1 and "position_ids" in seen[0]  # ... the layers do not
    assert not seen[0] & {attention.HOST_BOUNDS, *attention.VARLEN_KWARGS}, seen[0]


def test_an_error_in_the_forward_restores_the_attention_implementation(tiny_model_dir):
    from ssrengine.models.attention import no_mask_building
    from ssrengine.models.layers import decoder_layers

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with (
        pytest.raises(RuntimeError, match="boom"),
        no_mask_building(model, decoder_layers(model)[0]),
    ):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa_varlen"
    assert not decoder_layers(model)[0]._forward_pre_hooks


def test_sync_detector_sees_a_tolist_in_a_layer(tiny_model_dir):
    """The detector catches what it is meant to: boundaries read back from the device tensor
    (`cu_seq_lens_q.tolist()`) in every layer when no host boundaries are passed."""
    from ssrengine.models.attention import HOST_BOUNDS

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    mb = _packed_micro_batch([7, 12, 5])
    kwargs = {k: v for k, v in mb.model_kwargs.items() if k != HOST_BOUNDS}
    with sync_detector() as syncs:
        hidden_and_head(model, mb.input_ids, **kwargs)
    assert syncs[("attention.py", "sdpa_varlen_attention")] == model.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa_varlen", "flash_attention_2"])
def test_packed_step_on_cuda_never_syncs(tiny_model_dir, attn):
    """The same check with torch's own detector on a GPU: no sync in packed forward+backward,
    for sdpa_varlen (fp32) and FlashAttention-2 (bf16 autocast), with the Triton loss as the
    trainer runs it (validate=False)."""
    import warnings

    from ssrengine.training.loss import to_device

    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    autocast = "bfloat16" if attn == "flash_attention_2" else "float32"
    model = load_model(str(tiny_model_dir), dtype="float32", device="cuda", autocast=autocast,
                       attn_implementation=attn)  # fmt: skip
    mb = to_device(_packed_micro_batch([70, 120, 50, 90]), torch.device("cuda"))
    dtype = torch.bfloat16 if autocast == "bfloat16" else torch.float32
    forwards = 3
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(forwards):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    hidden, weight = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
                    loss = fused_linear_cross_entropy(
                        hidden.reshape(-1, hidden.shape[-1]), weight, mb.labels.reshape(-1),
                        validate=False,
                    )  # fmt: skip
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
