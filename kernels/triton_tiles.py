"""Tile sizes of the Triton cross-entropy kernels: the candidates, and which one a launch takes.

One fixed choice cannot suit A100 (163 KiB of shared memory per block), A10/L4 (99 KiB) and
H100 (227 KiB) alike, so each pass has a short list of candidates, best first (untuned: this
project has had no GPU to time them on; larger tiles reread hidden and weight less). A launch
takes the first candidate that, compiled for the device's architecture, fits its shared memory
and spills no registers to local memory: figures read from real compiles, the table
`tile_table.TILES` that `python -m ssrengine.kernels.aot --write-table` writes and
tests/test_triton_aot.py checks against fresh compiles, never a formula. Should a compiled
kernel still not fit (an architecture the table lacks), Triton raises `OutOfResources` before
it runs and the launch retries the next candidate and remembers it.

Torch and Triton only, like the rest of kernels/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import triton
from triton.runtime.errors import OutOfResources

from . import tile_table


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and pipeline depth of one kernel launch."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None  # vocabulary slices of the forward grid; None = heuristic


# Shared memory one block may opt into, by compute capability (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): what the launcher plans for when it
# cannot ask the device, and what the ahead-of-time compile checks against.
SHARED_MEMORY_BY_ARCH = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}

Pass = Literal["forward", "backward"]
T = TypeVar("T")

# Candidates per (pass, 16-bit or fp32 inputs), best first. The forward holds one (N, V) fp32
# logit tile; the backward holds it, the (N, V) gradient tile in the input dtype and the
# (N, D) and (V, D) products, so its tiles are smaller for the same registers: 128 x 128 x 64
# with 8 warps spilled there (sm80 bf16: 255 registers and 184 bytes of stack per thread).
_FORWARD_16BIT = (
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=2),
    KernelConfig(64, 128, 64, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 64, num_warps=4, num_stages=2),
    KernelConfig(32, 32, 32, num_warps=4, num_stages=1),
)
_BACKWARD_16BIT = (
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
    KernelConfig(32, 32, 32, num_warps=4, num_stages=1),
)
_FORWARD_FP32 = (
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
    KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
)
_BACKWARD_FP32 = (
    KernelConfig(128, 64, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 128, 32, num_warps=8, num_stages=2),
    KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
    KernelConfig(64, 64, 16, num_warps=4, num_stages=2),
    KernelConfig(32, 32, 16, num_warps=4, num_stages=1),
)


def candidate_configs(dtype: torch.dtype, kind: Pass) -> tuple[KernelConfig, ...]:
    if dtype == torch.float32:
        return _FORWARD_FP32 if kind == "forward" else _BACKWARD_FP32
    return _FORWARD_16BIT if kind == "forward" else _BACKWARD_16BIT


def mode_of(dtype: torch.dtype, tf32: bool) -> str:
    """The table's name of an input dtype: "fp32", "fp32+tf32", "bf16" or "fp16"."""
    if dtype == torch.float32:
        return "fp32+tf32" if tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def table_arch(arch: int) -> int | None:
    """The architecture of the table whose compiles stand for ``arch``: itself, else the
    nearest older one that shares its tensor-core instructions (sm90's wgmma only for sm9x:
    a consumer Blackwell, sm120, compiles like sm89), else None."""
    known = sorted({key[0] for key in tile_table.TILES})
    older = [a for a in known if a <= arch and (a // 10 == 9) == (arch // 10 == 9)]
    return older[-1] if older else None


def variant_of(kind: Pass, **flags: bool) -> str:
    """The table's variant standing for a launch's constexpr flags (`aot.VARIANTS`): "all"
    (every flag on: the most registers) for any logit option, else the pass's own."""
    if flags.get("bias") or flags.get("softcap") or flags.get("smoothing") or flags.get("db"):
        return "all"
    if kind == "forward":
        return "plain"
    if flags.get("filter"):
        return "filter"
    return "dh" if flags.get("dh") and not flags.get("dw") else "plain"


def pick_config(
    kind: Pass,
    dtype: torch.dtype,
    shared_memory: int,
    arch: int,
    tf32: bool = False,
    variant: str = "plain",
) -> tuple[int, KernelConfig]:
    """(index, config): the first candidate whose compiled ``variant`` fits ``shared_memory``
    bytes without spilling on ``arch`` (10 * major + minor). Without table figures: the first
    candidate (its launch then reports the real figure, see `launch`)."""
    tiles = candidate_configs(dtype, kind)
    known = table_arch(arch)
    key = (known, mode_of(dtype, tf32), kind, variant)
    rows = tile_table.TILES.get(key, ()) if known else ()
    for index, (shared, _registers, spill) in rows:
        if shared <= shared_memory and not spill:
            return index, tiles[index]
    if rows:  # none fits: the smallest candidate, whose launch reports the real figure
        return len(tiles) - 1, tiles[-1]
    return 0, tiles[0]


def device_arch(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_shared_memory(device: torch.device) -> int:
    """The opt-in shared memory per block of `device`, as Triton's launcher checks it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return int(props["max_shared_mem"])
    except Exception:  # no Triton driver: fall back to the per-arch figure
        return SHARED_MEMORY_BY_ARCH.get(device_arch(device), min(SHARED_MEMORY_BY_ARCH.values()))


# Per (pass, variant, dtype, TF32, arch, shared memory): the candidate index that launched. A
# compiled kernel that needs more shared memory than the device has raises OutOfResources
# before it runs, so falling back to the next candidate is always safe.
_CHOSEN: dict[tuple[str, str, torch.dtype, bool, int, int], int] = {}


def launch(
    kind: Pass,
    variant: str,
    cfg: KernelConfig | None,
    dtype: torch.dtype,
    tf32: bool,
    device: torch.device,
    run: Callable[[KernelConfig], T],
) -> T:
    """`run(cfg)`, or, when cfg is None, `run` with the candidate `pick_config` takes for the
    device, falling back to the next smaller one on OutOfResources (never a crash while a
    smaller candidate is left)."""
    if cfg is not None:
        return run(cfg)
    smem, arch = device_shared_memory(device), device_arch(device)
    key = (kind, variant, dtype, tf32, arch, smem)
    tiles = candidate_configs(dtype, kind)
    i = _CHOSEN.get(key)
    if i is None:
        i = pick_config(kind, dtype, smem, arch, tf32, variant)[0]
    while True:
        try:
            out = run(tiles[i])
        except OutOfResources:
            if i + 1 >= len(tiles):
                raise
            i += 1
            continue
        _CHOSEN[key] = i
        return out
