"""Compile the cross-entropy kernels ahead of time for a GPU target, on any machine.

Triton ships ptxas, so `triton.compile` builds the same cubin the JIT would build on an A100,
L4 or H100 without one: shared memory per block, registers, spills, and the PTX (tensor-core
instructions or not) can be checked in CI. Each kernel is compiled with the signature the JIT
derives from the launch arguments (`forward_kernel_args` / `backward_kernel_args` on meta
tensors, specialized by Triton's own `native_specialize_impl`), in every variant the launcher
can run (`VARIANTS`: bias, softcap, label smoothing, gradient filter, frozen lm_head).

    TRITON_INTERPRET= python -m ssrengine.kernels.aot --arch 80 86 89 90
    TRITON_INTERPRET= python -m ssrengine.kernels.aot --write-table

The first prints one JSON line per (arch, mode, pass, variant) for the tiles the launcher picks
there; the second compiles the candidates of every (arch, mode, pass) in order, up to the first
that fits without spilling, and writes their figures to kernels/tile_table.py, the table the
launcher picks from (`triton_tiles.pick_config`). The process must not run under
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
from . import triton_kernels, triton_tiles

ARCHS = (80, 86, 89, 90)
# name -> (input dtype, TF32 allowed for fp32 matmuls)
MODES = {
    "fp32": (torch.float32, False),
    "fp32+tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
PASSES = ("forward", "backward")
# The kernels a pass can compile to (each constexpr combination is a kernel of its own):
# name -> options. "all": every logit option at once, the most registers.
VARIANTS: dict[str, dict[str, dict[str, bool]]] = {
    "forward": {"plain": {}, "all": dict(bias=True, softcap=True, smoothing=True)},
    "backward": {
        "plain": dict(dh=True, dw=True),
        "dh": dict(dh=True),  # a frozen lm_head (LoRA): the hidden states' gradient only
        "filter": dict(dh=True, dw=True, filter=True),
        "all": dict(
            dh=True, dw=True, db=True, bias=True, softcap=True, smoothing=True, filter=True
        ),
    },
}
# A representative launch: SmolLM2's hidden size and vocabulary, one 4096-token micro-batch.
N, VOCAB, DIM = 4096, 49152, 576
TABLE = Path(__file__).with_name("tile_table.py")


@dataclasses.dataclass(frozen=True)
class Compiled:
    arch: int
    mode: str
    kernel: str  # the pass
    variant: str
    candidate: int  # index into triton_tiles.candidate_configs
    config: triton_tiles.KernelConfig
    shared: int
    shared_limit: int
    registers: int  # per thread
    # Per thread, as Triton's CompiledKernel reports it on a GPU (n_spills = the driver's
    # local memory size / 4): these kernels have no local arrays, so this is spill space.
    spill_bytes: int
    mma: int  # mma.sync instructions in the PTX (sm75-89 tensor cores)
    wgmma: int  # wgmma instructions (sm90 tensor cores)

    def row(self) -> dict:
        return dataclasses.asdict(self)

    def figures(self) -> tuple[int, int, int]:
        """What the table holds: (shared memory, registers, spill bytes)."""
        return self.shared, self.registers, self.spill_bytes


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
    (also right for a kernel Triton's cache served without running ptxas). The stack frame is
    what the driver reports as the function's local size (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
    Triton's n_spills * 4)."""
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


def _launch_args(
    kind: str, dtype: torch.dtype, cfg: triton_tiles.KernelConfig, opts: dict[str, bool]
) -> tuple[tuple, dict]:
    meta = dict(device="meta")
    hidden = torch.empty(N, DIM, dtype=dtype, **meta)
    weight = torch.empty(VOCAB, DIM, dtype=dtype, **meta)
    bias = torch.empty(VOCAB, dtype=dtype, **meta) if opts.get("bias") else None
    rows = torch.empty(N, dtype=torch.int64, **meta)
    y = torch.empty(N, dtype=torch.int64, **meta)
    count = torch.empty((), dtype=torch.int64, **meta)
    f32 = torch.empty(N, dtype=torch.float32, **meta)
    softcap = 30.0 if opts.get("softcap") else 0.0
    if kind == "forward":
        v_per_split = triton.cdiv(VOCAB, cfg.block_v) // 4 * cfg.block_v  # a 4-way split
        zsum = f32 if opts.get("smoothing") else None
        return tce.forward_kernel_args(
            hidden, weight, bias, rows, y, count, f32, f32, zsum, v_per_split, cfg, softcap
        )
    gh = torch.empty(N, DIM, dtype=torch.float32, **meta) if opts.get("dh") else None
    gw = torch.empty(VOCAB, DIM, dtype=torch.float32, **meta) if opts.get("dw") else None
    gb = torch.empty(VOCAB, dtype=torch.float32, **meta) if opts.get("db") else None
    return tce.backward_kernel_args(
        hidden, weight, bias, rows, y, count, f32, f32, f32, gh, gw, gb, cfg,
        filter_eps=2.0**-12 if opts.get("filter") else 0.0, softcap=softcap,
        smoothing=0.1 if opts.get("smoothing") else 0.0,
    )  # fmt: skip


def compile_one(arch: int, mode: str, kind: tce.Pass, variant: str, candidate: int) -> Compiled:
    """Compile one kernel variant for `arch` with the pass's candidate tile ``candidate``."""
    if tce.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    dtype, tf32 = MODES[mode]
    cfg = triton_tiles.candidate_configs(dtype, kind)[candidate]
    fn = (
        triton_kernels._lce_forward_kernel
        if kind == "forward"
        else triton_kernels._lce_backward_kernel
    )
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # what _precision() reads
    try:
        args, kwargs = _launch_args(kind, dtype, cfg, VARIANTS[kind][variant])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    signature, constexprs, attrs = _signature(fn, args, kwargs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = k.asm["ptx"]
    regs, stack = _resource_usage(k.asm["cubin"])
    return Compiled(
        arch, mode, kind, variant, candidate, cfg, k.metadata.shared,
        triton_tiles.SHARED_MEMORY_BY_ARCH[arch], regs, stack,
        mma=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
    )  # fmt: skip


def picked(arch: int, mode: str, kind: tce.Pass, variant: str) -> int:
    """The candidate the launcher picks on ``arch`` (from the table)."""
    dtype, tf32 = MODES[mode]
    limit = triton_tiles.SHARED_MEMORY_BY_ARCH[arch]
    return triton_tiles.pick_config(kind, dtype, limit, arch, tf32, variant)[0]


def table_rows(arch: int, mode: str, kind: tce.Pass, variant: str, log=None) -> tuple:
    """Candidates in order, up to the first that fits the architecture's shared memory
    without spilling: ((index, (shared, registers, spill bytes)), ...)."""
    dtype, _ = MODES[mode]
    limit = triton_tiles.SHARED_MEMORY_BY_ARCH[arch]
    rows = []
    for i in range(len(triton_tiles.candidate_configs(dtype, kind))):
        c = compile_one(arch, mode, kind, variant, i)
        if log:
            log(c)
        rows.append((i, c.figures()))
        if c.shared <= limit and c.spill_bytes == 0:
            break
    return tuple(rows)


def write_table(archs: tuple[int, ...], modes: list[str], passes: list[str], log=None) -> dict:
    """Compile the table rows of ``archs`` x ``modes`` x ``passes`` (every variant) and write
    them over their old rows in kernels/tile_table.py."""
    from . import tile_table

    table = dict(tile_table.TILES)
    for arch in archs:
        for mode in modes:
            for kind in passes:
                for variant in VARIANTS[kind]:
                    table[(arch, mode, kind, variant)] = table_rows(arch, mode, kind, variant, log)
                    _write(table)
    return table


def _write(table: dict) -> None:
    """kernels/tile_table.py with ``table``, laid out as ruff formats it."""
    head = TABLE.read_text().split("\nTILES")[0]
    kind = "dict[tuple[int, str, str, str], tuple[tuple[int, tuple[int, int, int]], ...]]"
    lines = [f"TILES: {kind} = {{"]
    for key in sorted(table):
        name = "(" + ", ".join(json.dumps(k) for k in key) + ")"
        rows = [f"({i}, {tuple(fig)})" for i, fig in table[key]]
        one = f"    {name}: ({', '.join(rows)}{',' if len(rows) == 1 else ''}),"
        if len(one) <= 100:
            lines.append(one)
        else:
            lines += [f"    {name}: (", *(f"        {r}," for r in rows), "    ),"]
    TABLE.write_text(head + "\n" + "\n".join(lines) + "\n}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssrengine.kernels.aot", description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--pass", dest="passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument(
        "--write-table", action="store_true", help=f"compile the candidates, write {TABLE.name}"
    )
    args = parser.parse_args(argv)

    def log(c: Compiled) -> None:
        print(json.dumps(c.row(), default=str), flush=True)

    if args.write_table:
        write_table(tuple(args.arch), args.mode, args.passes, log)
        return 0
    for arch in args.arch:
        for mode in args.mode:
            for kind in args.passes:
                for variant in VARIANTS[kind]:
                    log(compile_one(arch, mode, kind, variant, picked(arch, mode, kind, variant)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
