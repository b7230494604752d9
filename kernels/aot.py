"""Compile the cross-entropy kernels ahead of time for a GPU target, on any machine.

Triton ships ptxas, so `triton.compile` builds the same cubin the JIT would build on an A100,
L4 or H100 without one: shared memory per block, registers, spills, and the PTX (tensor-core
instructions or not) can be checked in CI. Each kernel is compiled with exactly the tiles
`pick_config` chooses for that architecture's shared memory and with the signature the JIT
derives from the launch arguments (`forward_kernel_args` / `backward_kernel_args` on meta
tensors, specialized by Triton's own `native_specialize_impl`).

    TRITON_INTERPRET= python -m ssrengine.kernels.aot --arch 80 86 89 90

prints one JSON line per (arch, mode, kernel). The process must not run under
TRITON_INTERPRET=1: an interpreted @triton.jit has no compiler front end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from . import triton_cross_entropy as tce

ARCHS = (80, 86, 89, 90)
# name -> (input dtype, TF32 allowed for fp32 matmuls)
MODES = {
    "fp32": (torch.float32, False),
    "fp32+tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
# A representative launch: SmolLM2's hidden size and vocabulary, one 4096-token micro-batch.
N, VOCAB, DIM = 4096, 49152, 576


@dataclasses.dataclass(frozen=True)
class Compiled:
    arch: int
    mode: str
    kernel: str
    config: tce.KernelConfig
    shared: int
    shared_estimate: int  # what the launcher planned with (estimate_shared_memory)
    shared_limit: int
    registers: int  # per thread
    stack_bytes: int  # per thread; these kernels have no local arrays, so this is spill space
    mma: int  # mma.sync instructions in the PTX (sm80-89 tensor cores)
    wgmma: int  # wgmma instructions (sm90 tensor cores)

    def row(self) -> dict:
        return dataclasses.asdict(self)


def _signature(fn: triton.JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) exactly as JITFunction._pack_args builds them."""
    from triton._C.libtriton import native_specialize_impl

    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(
            CUDABackend, value, param.is_const, not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )  # fmt: skip
        signature[param.name] = kind
        if kind == "constexpr":  # an integer argument equal to 1
            constexprs[(i,)] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from the cubin with the cuobjdump Triton ships
    (also right for a kernel Triton's cache served without running ptxas)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _launch_args(kind: str, dtype: torch.dtype, cfg: tce.KernelConfig) -> tuple[tuple, dict]:
    meta = dict(device="meta")
    hidden = torch.empty(N, DIM, dtype=dtype, **meta)
    weight = torch.empty(VOCAB, DIM, dtype=dtype, **meta)
    rows = torch.empty(N, dtype=torch.int64, **meta)
    y = torch.empty(N, dtype=torch.int64, **meta)
    count = torch.empty((), dtype=torch.int64, **meta)
    f32 = torch.empty(N, dtype=torch.float32, **meta)
    if kind == "forward":
        v_per_split = triton.cdiv(VOCAB, cfg.block_v) // 4 * cfg.block_v  # a 4-way split
        return tce.forward_kernel_args(hidden, weight, rows, y, count, f32, f32, v_per_split, cfg)
    gh = torch.empty(N, DIM, dtype=torch.float32, **meta)
    gw = torch.empty(VOCAB, DIM, dtype=torch.float32, **meta)
    return tce.backward_kernel_args(hidden, weight, rows, y, count, f32, f32, gh, gw, cfg)


def compile_one(arch: int, mode: str, kind: tce.Pass) -> Compiled:
    """Compile one kernel for `arch` with the tiles the launcher would pick there."""
    if tce.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    dtype, tf32 = MODES[mode]
    limit = tce.SHARED_MEMORY_BY_ARCH[arch]
    cfg = tce.pick_config(kind, dtype, limit)[1]
    fn = tce._lce_forward_kernel if kind == "forward" else tce._lce_backward_kernel
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # what _precision() reads
    try:
        args, kwargs = _launch_args(kind, dtype, cfg)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    signature, constexprs, attrs = _signature(fn, args, kwargs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = k.asm["ptx"]
    regs, stack = _resource_usage(k.asm["cubin"])
    return Compiled(
        arch, mode, kind, cfg, k.metadata.shared, tce.estimate_shared_memory(cfg, dtype, kind),
        limit, regs, stack,
        mma=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssrengine.kernels.aot", description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    for arch in args.arch:
        for mode in args.mode:
            for kind in ("forward", "backward"):
                print(json.dumps(compile_one(arch, mode, kind).row(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
