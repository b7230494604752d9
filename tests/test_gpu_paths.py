"""GPU code paths checked on the CPU: attention and dtype dispatch, the fused loss under
autocast, tile choice from shared memory, the empty batch on CUDA, DDP on older torch, the
interpreter default. (Compiled kernels: test_triton_aot.py; on a GPU: `pytest -m gpu`.)"""

from __future__ import annotations

import types

import pytest
import torch
from ssrengine.kernels.triton_cross_entropy import KernelConfig, OutOfResources

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.kernels import fused_linear_cross_entropy
from ssrengine.kernels import triton_cross_entropy as tce
from ssrengine.kernels import triton_tiles as tiles
from ssrengine.models import attention
from ssrengine.training import distributed
from tests.conftest import default_triton_interpret

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ------------------------------------------------------------------- attention and dtypes
@pytest.fixture
def flash_installed(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: True)


@pytest.mark.parametrize(
    "weights,autocast,want",
    [
        ("float32", "float32", "sdpa_varlen"),  # flash-attn rejects fp32
        ("float32", "bfloat16", "flash_attention_2"),  # transformers casts q/k/v under autocast
        ("bfloat16", "float32", "flash_attention_2"),
        ("float16", "float32", "flash_attention_2"),
    ],
)
def test_auto_attention_is_flash_only_for_16bit_compute(flash_installed, weights, autocast, want):
    pick = attention.pick_attn_implementation
    assert pick("auto", CUDA, weights=weights, autocast=autocast) == want
    assert pick("auto", CPU, weights=weights, autocast=autocast) == "sdpa_varlen"


def test_explicit_flash_with_fp32_compute_is_refused(flash_installed):
    with pytest.raises(InputError, match=r"model\.attn_implementation"):
        attention.pick_attn_implementation("flash_attention_2", CUDA, weights="float32")


def test_train_dtype_auto_is_bf16_autocast_on_cuda_gpus_with_bf16_only():
    assert Config().train.dtype == "auto" and Config().model.dtype == "float32"
    assert attention.compute_dtype("auto", CUDA, cap=(8, 0)) == "bfloat16"  # A100
    assert attention.compute_dtype("auto", CUDA, cap=(9, 0)) == "bfloat16"  # H100
    assert attention.compute_dtype("auto", CUDA, cap=(7, 5)) == "float32"  # T4: no bf16
    assert attention.compute_dtype("auto", CPU) == "float32"
    assert attention.compute_dtype("float32", CUDA) == "float32"
    assert attention.compute_dtype("float16", CUDA, cap=(7, 0)) == "float16"


# ------------------------------------------------------------------ fused loss and autocast
def _inputs(n=24, h=32, v=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_loss_follows_autocast(impl):
    """Under bf16 autocast, fp32 hidden and weight are multiplied in bf16 (tensor cores on a
    GPU), exactly as explicit bf16 inputs; the fp32 master weight still gets an fp32 grad."""
    hidden, weight, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fused_linear_cross_entropy(hidden, weight, labels, impl=impl)
    auto.backward()
    explicit = fused_linear_cross_entropy(
        hidden.bfloat16(), weight.detach().bfloat16(), labels, impl=impl
    )
    fp32 = fused_linear_cross_entropy(hidden, weight.detach(), labels, impl=impl)
    assert torch.equal(auto, explicit)
    assert not torch.equal(auto, fp32)
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_retention_scores_in_the_model_dtype(tiny_model_dir, monkeypatch):
    """The scorer gets the model's bf16 hidden states and lm_head, not fp32 copies."""
    import ssrengine.kernels as K
    from ssrengine.evaluation.retention import score_sequences
    from ssrengine.models.loading import load_model

    seen = []
    real = K.sequence_log_likelihood

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(K, "sequence_log_likelihood", spy)
    model = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    scores = score_sequences(model, [([1, 2, 3, 4], [-100, -100, 3, 4])])
    assert seen == [(torch.bfloat16, torch.bfloat16)] and scores[0][1] == 2


# --------------------------------------------------------------- tiles from shared memory
MODES = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)]  # fmt: skip


@pytest.mark.parametrize("arch,limit", sorted(tiles.SHARED_MEMORY_BY_ARCH.items()))
@pytest.mark.parametrize("dtype,tf32", MODES, ids=["fp32", "fp32+tf32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_picked_tiles_fit_without_spilling_by_the_compiled_table(arch, limit, dtype, tf32, kind):
    """The pick is the first candidate whose compiled figures (kernels/tile_table.py, checked
    against fresh compiles by test_triton_aot.py) fit the shared memory and spill nothing."""
    variants = ("plain", "all") if kind == "forward" else ("plain", "dh", "filter", "all")
    for variant in variants:
        index, cfg = tiles.pick_config(kind, dtype, limit, arch, tf32, variant)
        known = tiles.table_arch(arch)
        rows = dict(tiles.tile_table.TILES[(known, tiles.mode_of(dtype, tf32), kind, variant)])
        shared, _registers, spill = rows[index]
        assert shared <= limit and spill == 0, (variant, cfg)
        assert all(rows[i][0] > limit or rows[i][2] for i in rows if i < index), "not the first"


def test_a100_gets_the_3_stage_backward_and_sm86_sm89_the_128_row_tile():
    """What the shared-memory formula cost (it overestimated 1.3-2x): the compiled figures
    give A100 the 3-stage bf16 backward and sm86/sm89 its 128-row tile."""
    for arch in (80, 86, 89):
        limit = tiles.SHARED_MEMORY_BY_ARCH[arch]
        cfg = tiles.pick_config("backward", torch.bfloat16, limit, arch)[1]
        assert (cfg.block_n, cfg.block_v, cfg.num_stages) == (128, 128, 3), arch


def test_an_arch_the_table_lacks_takes_the_nearest_older_ones_figures():
    assert tiles.table_arch(87) == 86 and tiles.table_arch(91) == 90
    assert tiles.table_arch(120) == 89  # consumer Blackwell: mma, not sm90's wgmma
    assert tiles.table_arch(70) is None
    pick = tiles.pick_config("backward", torch.bfloat16, 10**6, 70)  # no figures: the first
    assert pick == (0, tiles.candidate_configs(torch.bfloat16, "backward")[0])


def test_variant_of_a_launch():
    assert tiles.variant_of("forward") == "plain"
    assert tiles.variant_of("forward", softcap=True) == "all"
    assert tiles.variant_of("backward", dh=True, dw=True) == "plain"
    assert tiles.variant_of("backward", dh=True) == "dh"
    assert tiles.variant_of("backward", dh=True, dw=True, filter=True) == "filter"
    assert tiles.variant_of("backward", dh=True, bias=True, db=True) == "all"


def test_launch_falls_back_on_out_of_resources(monkeypatch):
    """A compiled kernel over the device's shared memory raises OutOfResources before it runs:
    the launcher retries with the next smaller candidate and remembers the one that ran."""
    monkeypatch.setattr(tiles, "device_shared_memory", lambda device: 10**9)
    monkeypatch.setattr(tiles, "device_arch", lambda device: 70)  # no figures: the largest
    monkeypatch.setattr(tiles, "_CHOSEN", {})
    cands = tiles.candidate_configs(torch.bfloat16, "backward")
    tried: list[KernelConfig] = []

    def run(tile: KernelConfig) -> str:
        tried.append(tile)
        if tile in cands[:2]:  # the two largest do not fit this (pretend) device
            raise OutOfResources(10**6, 10**5, "shared memory")
        return "ran"

    launch = tiles.launch
    assert launch("backward", "plain", None, torch.bfloat16, False, CUDA, run) == "ran"
    assert tried == list(cands[:3])
    tried.clear()
    assert launch("backward", "plain", None, torch.bfloat16, False, CUDA, run) == "ran"
    assert tried == [cands[2]]  # remembered: no failing launch again


def test_launch_reraises_when_no_smaller_tile_is_left(monkeypatch):
    monkeypatch.setattr(tiles, "device_shared_memory", lambda device: 0)
    monkeypatch.setattr(tiles, "device_arch", lambda device: 80)
    monkeypatch.setattr(tiles, "_CHOSEN", {})

    def run(tile: KernelConfig) -> None:
        raise OutOfResources(1, 0, "shared memory")

    with pytest.raises(OutOfResources):
        tiles.launch("forward", "plain", None, torch.float32, False, CUDA, run)


# ------------------------------------------------------------------- empty batch on CUDA
def test_num_splits_of_an_empty_batch_on_cuda(monkeypatch):
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cfg = KernelConfig(128, 128, 64)
    assert tce._num_splits(cfg, 0, 49152, CUDA) == 1
    assert tce._num_splits(cfg, 4096, 49152, CUDA) == 9  # 264 programs over 32 row blocks


# --------------------------------------------------------------------- environment layout
def test_ddp_without_forward_sync_buffers_uses_broadcast_buffers(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    assert distributed.no_buffer_sync_kwargs() == {"forward_sync_buffers": False}

    def old_init(self, module, device_ids=None, broadcast_buffers=True):  # torch <= 2.1x
        raise AssertionError("not called")

    monkeypatch.setattr(DistributedDataParallel, "__init__", old_init)
    assert distributed.no_buffer_sync_kwargs() == {"broadcast_buffers": False}


def test_triton_interpret_only_without_a_gpu():
    env: dict[str, str] = {}
    default_triton_interpret(env, cuda=True)
    assert "TRITON_INTERPRET" not in env
    default_triton_interpret(env, cuda=False)
    assert env["TRITON_INTERPRET"] == "1"
    env = {"TRITON_INTERPRET": "0"}
    default_triton_interpret(env, cuda=False)
    assert env["TRITON_INTERPRET"] == "0"


# ----------------------------------------------------------------------------- on a GPU
def _packed(examples: list[list[int]]):
    from ssrengine.models.packing import pack

    seqs = [(ids, [-100] * 2 + ids[2:]) for ids in examples]
    [batch] = pack(seqs, sum(len(s) for s, _ in seqs))
    return batch.to("cuda")


@pytest.mark.gpu
def test_fp32_weights_train_under_bf16_autocast_with_flash_attention(tiny_model_dir):
    """The GPU default (fp32 master weights, train.dtype auto = bf16 autocast) picks FA2 and
    runs forward and backward through it and the Triton loss; without autocast the same weights
    get sdpa_varlen instead of a flash-attn dtype error."""
    pytest.importorskip("flash_attn")
    from ssrengine.models.loading import hidden_and_head, load_model
    from ssrengine.models.packing import model_inputs

    auto = attention.compute_dtype("auto", CUDA)
    model = load_model(str(tiny_model_dir), dtype="float32", device="cuda", autocast=auto)
    assert model.config._attn_implementation == "flash_attention_2"
    batch = _packed([list(range(3, 40)), list(range(5, 30))])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden, weight = hidden_and_head(model, **model_inputs(batch, "flash_attention_2"))
        loss = fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, batch.labels
        )
    loss.backward()
    assert torch.isfinite(loss).item()
    assert model.get_output_embeddings().weight.grad.dtype == torch.float32

    plain = load_model(str(tiny_model_dir), dtype="float32", device="cuda", autocast="float32")
    assert plain.config._attn_implementation == "sdpa_varlen"
    with torch.no_grad():
        hidden, _ = hidden_and_head(plain, **model_inputs(batch, "sdpa_varlen"))
    assert hidden.dtype == torch.float32 and torch.isfinite(hidden).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fp32_master_weight_gets_its_gradient_without_copies_under_autocast(impl):
    """The kernel's autograd node takes the fp32 lm_head weight itself and casts it inside: its
    gradient goes from the kernel's fp32 buffer straight to .grad, not as a bf16 copy through
    a cast node that copies it back to fp32 (two (V, H) copies per micro-batch)."""
    hidden, weight, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, impl=impl)
    node = loss.grad_fn
    while type(node).__name__ not in (
        "_TorchLinearCrossEntropyBackward",
        "_TritonLinearCrossEntropyBackward",
    ):
        node = node.next_functions[0][0]
    weight_edge = node.next_functions[1][0]
    assert type(weight_edge).__name__ == "AccumulateGrad" and weight_edge.variable is weight
    seen = []
    weight.register_hook(lambda g: seen.append(g.dtype))
    loss.backward()
    assert seen == [torch.float32]


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.interpreter),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_grad_into_weight_accumulates_without_a_gradient_buffer(device):
    """grad_into_weight: over three micro-batches (the trainer's accumulation, bf16 autocast
    over an fp32 master weight) the kernel adds into weight.grad itself, autograd only gets a
    broadcast zero (no [V, H] buffer per call), and the gradients equal the default path's."""
    batches = [[t.to(device) for t in _inputs(seed=s)] for s in range(3)]
    weight = batches[0][1]
    grads = {}
    for into in (False, True):
        w = weight.detach().clone().requires_grad_()
        h_grads, strides = [], []
        w.register_hook(lambda g, strides=strides: strides.append(g.stride()))
        for hidden, _, labels in batches:
            h = hidden.clone().requires_grad_()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = fused_linear_cross_entropy(
                    h, w, labels, impl="triton", grad_into_weight=into
                )
            (loss / 7).backward()
            h_grads.append(h.grad)
        grads[into] = (w.grad, h_grads, strides)
    (w0, h0, s0), (w1, h1, s1) = grads[False], grads[True]
    assert s0 == [w0.stride()] * 3 and s1 == [(0, 0)] * 3
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)
    for a, b in zip(h1, h0):
        assert torch.equal(a, b)
