"""Inference precision on a GPU (`ssrengine.models.precision`): generation, eval and retention
compute as training's train.dtype = auto (bf16 autocast over fp32 weights where the GPU has
bf16), fp32 matmuls use TF32 on Ampere and newer, and sdpa_varlen never hands SDPA a fp32 or
masked grouped-query call it would run in the math kernel.

The decisions are pure functions of the compute capability, checked here on the CPU; the
wiring is checked by forcing the decision on the CPU (bf16 autocast exists there too); the
`gpu` tests run the real thing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssrengine.evaluation import retention
from ssrengine.models import attention, precision
from ssrengine.models.loading import load_model

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
T4, V100, A100, A10, H100 = (7, 5), (7, 0), (8, 0), (8, 6), (9, 0)


@pytest.mark.parametrize("cap,bf16", [(None, False), (V100, False), (T4, False), (A100, True),
                                      (A10, True), (H100, True)])  # fmt: skip
def test_bf16_and_tf32_from_ampere_on(cap, bf16):
    assert precision.has_bf16(cap) is bf16
    assert precision.wants_tf32(cap) is bf16


def test_inference_dtype_is_trainings_auto():
    assert precision.inference_dtype(torch.float32, A100) == "bfloat16"
    assert precision.inference_dtype(torch.float32, H100) == "bfloat16"
    assert precision.inference_dtype(torch.float32, T4) == "float32"  # no bf16: fp32 (+ no TF32)
    assert precision.inference_dtype(torch.float32, None) == "float32"  # the CPU
    assert precision.inference_dtype(torch.bfloat16, A100) == "float32"  # 16-bit weights: as is
    assert precision.inference_dtype(torch.float16, T4) == "float32"
    for cap in (None, T4, A100, H100):  # the same rule as training's train.dtype = auto
        want = attention.compute_dtype("auto", CUDA if cap else CPU, cap=cap)
        assert precision.inference_dtype(torch.float32, cap) == want


@pytest.fixture
def tf32_flags():
    """torch's TF32 switches, restored after the test (they are process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_enable_tf32_on_ampere_only(monkeypatch, tf32_flags):
    monkeypatch.setattr(precision, "capability", lambda device: T4)
    assert not precision.enable_tf32(CUDA) and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(precision, "capability", lambda device: A100)
    assert precision.enable_tf32(CUDA)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_sdpa_varlen_repeats_kv_heads_where_sdpa_would_use_its_math_kernel():
    assert attention.expands_gqa(torch.float32, "cuda")
    assert attention.expands_gqa(torch.bfloat16, "cuda", masked=True)  # sliding-window band
    assert not attention.expands_gqa(torch.bfloat16, "cuda")  # flash takes enable_gqa
    assert not attention.expands_gqa(torch.float32, "cpu")


def test_repeated_kv_heads_give_the_same_attention(monkeypatch):
    """The repeat path (forced on the CPU) equals SDPA's own enable_gqa, per packed example."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g)
    k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(2))
    module = torch.nn.Module()

    def run() -> torch.Tensor:
        return attention.sdpa_varlen_attention(module, q, k, v, None, cu_seq_lens_host=(0, 5, 12))[0]  # fmt: skip

    native = run()
    monkeypatch.setattr(attention, "expands_gqa", lambda *a, **k: True)
    torch.testing.assert_close(run(), native, rtol=1e-6, atol=1e-6)
    want = F.scaled_dot_product_attention(q[..., :5, :], k[..., :5, :], v[..., :5, :],
                                          is_causal=True, enable_gqa=True)  # fmt: skip
    torch.testing.assert_close(native[:, :5], want.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_lm_eval_loads_bf16_weights_where_eval_computes_in_bf16(monkeypatch):
    monkeypatch.setattr(precision, "capability", lambda device: A100)
    assert retention.lm_eval_dtype("float32", "cuda") == "bfloat16"
    assert retention.lm_eval_dtype("float16", "cuda") == "float16"
    monkeypatch.setattr(precision, "capability", lambda device: T4)
    assert retention.lm_eval_dtype("float32", "cuda") == "float32"


# ----------------------------------------------------------------------------- the wiring
@pytest.fixture
def bf16_inference(monkeypatch, tf32_flags):
    """The decision a GPU with bf16 makes, on the CPU: fp32 weights, bf16 autocast."""
    monkeypatch.setattr(precision, "capability", lambda device: A100)
    original = precision.inference_dtype
    monkeypatch.setattr(precision, "inference_dtype", lambda w, cap: original(w, A100))


def _matmul_dtypes(model) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_generation_runs_under_the_inference_autocast(tiny_model_dir, bf16_inference):
    from ssrengine.core.config import GenerationConfig, ModelConfig
    from ssrengine.generation.base import Request, SamplingParams
    from ssrengine.generation.hf import HFGenerator

    gen = HFGenerator(ModelConfig(path=str(tiny_model_dir), device="cpu"), GenerationConfig())
    assert next(gen.hf_model.parameters()).dtype == torch.float32
    seen = _matmul_dtypes(gen.hf_model)
    [out] = gen.generate([Request(input_ids=[1, 2, 3])], SamplingParams(max_new_tokens=3))
    assert seen and set(seen) == {torch.bfloat16} and len(out.token_ids) <= 3


def test_scoring_runs_under_the_inference_autocast(tiny_model_dir, bf16_inference):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    seen = _matmul_dtypes(model)
    [(lp, n)] = retention.score_sequences(model, [([1, 2, 3, 4], [-100, -100, 3, 4])])
    assert seen and set(seen) == {torch.bfloat16} and n == 2 and lp < 0


def test_no_autocast_on_the_cpu(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    seen = _matmul_dtypes(model)
    retention.score_sequences(model, [([1, 2, 3, 4], [-100, -100, 3, 4])])
    assert set(seen) == {torch.float32}


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_gpu_generation_and_scoring_compute_in_bf16_with_tf32(tiny_model_dir):
    from ssrengine.core.config import GenerationConfig, ModelConfig
    from ssrengine.generation.base import Request, SamplingParams
    from ssrengine.generation.hf import HFGenerator

    cap = torch.cuda.get_device_capability()
    gen = HFGenerator(ModelConfig(path=str(tiny_model_dir), device="cuda"), GenerationConfig())
    want = torch.bfloat16 if cap >= (8, 0) else torch.float32
    assert torch.backends.cuda.matmul.allow_tf32 is (cap >= (8, 0))
    seen = _matmul_dtypes(gen.hf_model)
    gen.generate([Request(input_ids=[1, 2, 3])], SamplingParams(max_new_tokens=3))
    retention.score_sequences(gen.hf_model, [([1, 2, 3, 4], [-100, -100, 3, 4])])
    assert seen and set(seen) == {want}
