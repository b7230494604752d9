"""Every Triton kernel compiled ahead of time for A100 (sm80), A10/RTX 30xx (sm86), L4/L40S/RTX
40xx (sm89) and H100/H200 (sm90), with the tiles the launcher picks there for fp32, fp32+TF32,
bf16 and fp16 (`ssrengine.kernels.aot`; Triton ships ptxas, no GPU needed).

Asserted per kernel: shared memory within the architecture's per-block limit (else the launch
raises OutOfResources on that card), and tensor-core instructions wherever the inputs allow
them (`mma` on sm80-89, `wgmma` on sm90; IEEE fp32 has neither). Registers and stack bytes per
thread (spill space: these kernels have no local arrays) are printed (`pytest -s`). The compiles run in subprocesses without TRITON_INTERPRET (conftest sets
it on machines without a GPU; an interpreted kernel has no compiler front end), one per CPU,
and Triton's on-disk cache makes reruns fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 86, 89, 90)
MODES = ("fp32", "fp32+tf32", "bf16", "fp16")


def _compile(archs: tuple[int, ...]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cmd = [sys.executable, "-m", "ssrengine.kernels.aot", "--arch", *map(str, archs)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    workers = max(1, min(2, os.cpu_count() or 1))
    groups = [ARCHS[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(len(groups)) as pool:
        rows = [r for part in pool.map(_compile, groups) for r in part]
    print(
        "\narch mode       kernel   tiles (N,V,D,warps,stages)  shared/limit  regs stack mma wgmma"
    )
    for r in sorted(rows, key=lambda r: (r["arch"], r["mode"], r["kernel"])):
        c = r["config"]
        tiles = f"{c['block_n']},{c['block_v']},{c['block_d']},{c['num_warps']},{c['num_stages']}"
        print(
            f"sm{r['arch']} {r['mode']:<10} {r['kernel']:<8} {tiles:<27} "
            f"{r['shared']:>6}/{r['shared_limit']:<6} {r['registers']:>4} {r['stack_bytes']:>6} "
            f"{r['mma']:>3} {r['wgmma']:>5}"
        )
    return rows


def test_every_kernel_arch_and_mode_is_compiled(compiled):
    got = {(r["arch"], r["mode"], r["kernel"]) for r in compiled}
    want = {(a, m, k) for a in ARCHS for m in MODES for k in ("forward", "backward")}
    assert got == want


def test_shared_memory_fits_the_arch(compiled):
    over = [r for r in compiled if r["shared"] > r["shared_limit"]]
    assert not over, [(r["arch"], r["mode"], r["kernel"], r["shared"]) for r in over]


def test_the_launchers_estimate_bounds_the_real_figure(compiled):
    under = [r for r in compiled if r["shared"] > r["shared_estimate"]]
    assert not under, [(r["arch"], r["mode"], r["kernel"], r["shared"]) for r in under]


def test_16bit_and_tf32_use_tensor_cores(compiled):
    for r in compiled:
        tensor_core = r["wgmma"] if r["arch"] >= 90 else r["mma"]
        where = (r["arch"], r["mode"], r["kernel"])
        if r["mode"] == "fp32":  # IEEE fp32 dot: CUDA cores by definition
            assert r["mma"] == 0 and r["wgmma"] == 0, where
        else:
            assert tensor_core > 0, where


def test_registers_are_reported(compiled):
    assert all(0 < r["registers"] <= 255 for r in compiled)
