"""train.dtype = float16 for GPUs without bf16 (T4, V100): fp16 autocast over fp32 master
weights with a dynamic loss scale (torch.amp.GradScaler), run on the CPU, where torch has both.

A step whose fp16 gradients overflow is recomputed at a halved scale (the first steps find the
scale this way) instead of counting as a non-finite step; the scale is checkpointed and comes
back on resume; fp16 over 16-bit weights or with FSDP2 is refused naming the key.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from ssrengine.core.errors import InputError
from ssrengine.training import net
from ssrengine.training.trainer import setup, train_step
from tests.test_trainer import _cfg, rehearsal

FP16 = ("--train.dtype=float16", "--train.loss_impl=torch", "--train.warmup_steps=0")


def _linear_output_dtypes(tr) -> list[torch.dtype]:
    """Records the output dtype of every nn.Linear forward of the next step."""
    seen: list[torch.dtype] = []
    for m in tr.hf_model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_a_float16_step_computes_in_fp16_and_updates_fp32_weights(tiny_model_dir, tmp_path):
    tr = setup(_cfg(tiny_model_dir, tmp_path, *FP16), tmp_path, rows=rehearsal())
    assert tr.autocast == torch.float16
    assert isinstance(tr.scaler, torch.amp.GradScaler) and tr.scaler.get_scale() == 2.0**16
    before = {k: p.detach().clone() for k, p in tr.hf_model.named_parameters()}
    seen = _linear_output_dtypes(tr)
    s = train_step(tr)
    assert s.applied and math_finite(s.loss) and tr.step == 1
    assert seen and set(seen) == {torch.float16}, "the matmuls ran in fp16"
    after = dict(tr.hf_model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values()), "fp32 master weights"
    assert any(not torch.equal(before[k], p) for k, p in after.items())


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_an_overflowing_step_is_recomputed_at_a_lower_scale(tiny_model_dir, tmp_path):
    """At a loss scale of 2^30 the fp16 gradients overflow: the step runs again at halved
    scales until they fit, and is applied (not counted as non-finite), with the gradients a
    scale that never overflowed gives, up to fp16 rounding."""
    grads = []
    for scale in (2.0**30, 2.0**6):
        tr = setup(_cfg(tiny_model_dir, tmp_path / str(scale), *FP16), tmp_path, rows=rehearsal())
        tr.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        step, seen = tr.optimizer.step, {}

        def spy(*args, step=step, seen=seen, tr=tr, **kwargs):
            seen.update({k: p.grad.clone() for k, p in tr.hf_model.named_parameters()})
            return step(*args, **kwargs)

        tr.optimizer.step = spy
        s = train_step(tr)
        assert s.applied and tr.step == 1 and tr.skipped == 0
        grads.append(seen)
        if scale == 2.0**30:
            assert tr.scaler.get_scale() < 2.0**20, "the scale came down"
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.isfinite(grads[0][k]).all(), k
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-2, atol=1e-6)


def test_the_loss_scale_is_checkpointed_and_resumed(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, *FP16)
    tr = setup(cfg, tmp_path, rows=rehearsal())
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    train_step(tr)
    scale = tr.scaler.get_scale()
    path = tr.save()
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == scale
    resumed = setup(cfg, tmp_path, rows=rehearsal(), resume=path)
    assert resumed.scaler.get_scale() == scale != 2.0**16


@pytest.mark.parametrize(
    "extra,field",
    [(("--model.dtype=bfloat16",), "model.dtype"), (("--train.parallel=fsdp",), "train.dtype")],
)
def test_float16_refuses_16bit_weights_and_fsdp(tiny_model_dir, tmp_path, extra, field):
    cfg = _cfg(tiny_model_dir, tmp_path, *FP16, *extra)
    world = types.SimpleNamespace(size=2 if "fsdp" in extra[0] else 1, device=torch.device("cpu"))
    with pytest.raises(InputError) as info:
        net.bf16_dtypes(cfg, world)
    assert info.value.field == field


def test_other_dtypes_get_no_scaler():
    assert net.grad_scaler(torch.bfloat16, torch.device("cpu")) is None
    assert net.grad_scaler(None, torch.device("cpu")) is None
