"""Gradient accumulation communicates once per optimizer step, on 2 gloo ranks: FSDP2 and DDP
reduce gradients only in the last micro-batch's backward, and the accumulated gradients still
equal one process's over the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssrengine.models.loading import load_model
from ssrengine.training.loss import CausalLMLoss, accumulate
from tests.grad_sync_probe import micro_batches_for_probe

ROOT = Path(__file__).resolve().parents[1]


def _probe(
    model_dir: Path, parallel: str, accum: int, out: Path, impl: str = "torch"
) -> tuple[dict, dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    script = str(ROOT / "tests" / "grad_sync_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [*cmd, script, str(model_dir), parallel, str(accum), str(out), impl],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    counts = json.loads((out / "counts.json").read_text())
    return load_file(str(out / "grads.safetensors")), counts


def _one_process_grads(model_dir: Path, n: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = load_model(str(model_dir), dtype="float32", device="cpu", attn_implementation="sdpa")
    model.train()
    net = CausalLMLoss(model, "torch")
    accumulate(net, micro_batches_for_probe(n), impl="torch")
    return {k: p.grad for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_gradients_cross_ranks_once_per_step(tiny_model_dir, tmp_path, parallel):
    once = _probe(tiny_model_dir, parallel, 1, tmp_path / "accum1")[1]["collectives"]
    grads, counts = _probe(tiny_model_dir, parallel, 3, tmp_path / "accum3")
    three = counts["collectives"]
    # One micro-batch or three: the same collectives, issued once (FSDP2: one reduce-scatter
    # per sharded unit; DDP: one all-reduce per bucket).
    assert once > 0 and three == once
    ref = _one_process_grads(tiny_model_dir, 6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(
            grads[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.mark.interpreter
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_triton_loss_adding_into_grad_under_fsdp_and_ddp(tiny_model_dir, tmp_path, parallel):
    """The Triton loss adds the lm_head gradient into .grad itself (grad_into_weight, as the
    trainer runs it): FSDP2's reduce-scatter and DDP's all-reduce still see it, once."""
    grads, counts = _probe(tiny_model_dir, parallel, 3, tmp_path / "triton", "triton")
    assert counts["into_grad"] == 3  # every micro-batch's backward on rank 0 took that path
    ref = _one_process_grads(tiny_model_dir, 6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(
            grads[k], ref[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
