"""Every Triton kernel compiled ahead of time for A100 (sm80), A10/RTX 30xx (sm86), L4/L40S/RTX
40xx (sm89) and H100/H200 (sm90), for fp32, fp32+TF32, bf16 and fp16, in every variant the
launcher runs (`aot.VARIANTS`: plain; with bias, softcap and label smoothing; a frozen lm_head;
the gradient filter), each with the tiles the launcher picks there
(`ssrengine.kernels.aot`; Triton ships ptxas, no GPU needed).

Asserted per kernel: its fresh figures (shared memory, registers, spill bytes) equal those of
kernels/tile_table.py, the table the launcher picks from (a stale table fails here: regenerate
it with `TRITON_INTERPRET= python -m ssrengine.kernels.aot --write-table`); no register spills;
shared memory within the architecture's per-block limit (else the launch raises
OutOfResources on that card); tensor-core instructions wherever the inputs allow them (`mma`
on sm80-89, `wgmma` on sm90; IEEE fp32 has neither). The compiles run in subprocesses without
TRITON_INTERPRET (conftest sets it on machines without a GPU; an interpreted kernel has no
compiler front end), one per CPU, and Triton's on-disk cache makes reruns fast (96 kernels:
minutes the first time on two cores). `pytest -s` prints the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ssrengine.kernels import aot, tile_table, triton_tiles

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 86, 89, 90)
MODES = ("fp32", "fp32+tf32", "bf16", "fp16")
KERNELS = [(k, v) for k in aot.PASSES for v in aot.VARIANTS[k]]


def _compile(archs: tuple[int, ...]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cmd = [sys.executable, "-m", "ssrengine.kernels.aot", "--arch", *map(str, archs)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    workers = max(1, min(2, os.cpu_count() or 1))
    groups = [ARCHS[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(len(groups)) as pool:
        rows = [r for part in pool.map(_compile, groups) for r in part]
    print("\narch mode       pass     variant tiles (N,V,D,warps,stages)  shared/limit  regs spill mma wgmma")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["arch"], r["mode"], r["kernel"], r["variant"])):
        c = r["config"]
        tiles = f"{c['block_n']},{c['block_v']},{c['block_d']},{c['num_warps']},{c['num_stages']}"
        print(
            f"sm{r['arch']} {r['mode']:<10} {r['kernel']:<8} {r['variant']:<7} {tiles:<27} "
            f"{r['shared']:>6}/{r['shared_limit']:<6} {r['registers']:>4} {r['spill_bytes']:>5} "
            f"{r['mma']:>3} {r['wgmma']:>5}"
        )
    return rows


def _where(r: dict) -> tuple:
    return (r["arch"], r["mode"], r["kernel"], r["variant"], r["config"])


def test_every_arch_mode_pass_and_variant_is_compiled(compiled):
    got = {(r["arch"], r["mode"], r["kernel"], r["variant"]) for r in compiled}
    want = {(a, m, k, v) for a in ARCHS for m in MODES for k, v in KERNELS}
    assert got == want


def test_the_table_holds_the_fresh_figures(compiled):
    """What the launcher picks from is what the compiler produces today."""
    stale = []
    for r in compiled:
        rows = dict(tile_table.TILES[(r["arch"], r["mode"], r["kernel"], r["variant"])])
        fresh = (r["shared"], r["registers"], r["spill_bytes"])
        if rows.get(r["candidate"]) != fresh:
            stale.append((_where(r), rows.get(r["candidate"]), fresh))
    assert not stale, stale


def test_no_picked_kernel_spills_registers(compiled):
    spilled = [(_where(r), r["registers"], r["spill_bytes"]) for r in compiled if r["spill_bytes"]]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in compiled)


def test_shared_memory_fits_the_arch(compiled):
    over = [(_where(r), r["shared"]) for r in compiled if r["shared"] > r["shared_limit"]]
    assert not over, over


def test_16bit_and_tf32_use_tensor_cores(compiled):
    for r in compiled:
        tensor_core = r["wgmma"] if r["arch"] >= 90 else r["mma"]
        if r["mode"] == "fp32":  # IEEE fp32 dot: CUDA cores by definition
            assert r["mma"] == 0 and r["wgmma"] == 0, _where(r)
        else:
            assert tensor_core > 0, _where(r)


def test_the_table_rows_stop_at_the_first_fit():
    """Each row lists candidates in order up to the first that fits without spilling: the one
    the launcher picks on that architecture."""
    for (arch, mode, kind, variant), rows in tile_table.TILES.items():
        limit = triton_tiles.SHARED_MEMORY_BY_ARCH[arch]
        indices = [i for i, _ in rows]
        assert indices == list(range(len(rows))), (arch, mode, kind, variant)
        *before, (last, (shared, _, spill)) = rows
        assert shared <= limit and spill == 0 and aot.picked(arch, mode, kind, variant) == last
        assert all(s > limit or sp for _, (s, _, sp) in before)
