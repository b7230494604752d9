"""Benchmark: fused masked linear cross-entropy vs naive F.cross_entropy(hidden @ W.T).

Forward, backward and forward+backward time and peak memory at real lm_head shapes with 60% of
the tokens ignored (prompt tokens), reduction "sum":

    python benchmarks/bench_cross_entropy.py                      # CPU: torch path vs naive
    python benchmarks/bench_cross_entropy.py --shapes smollm2 --n 8192
    python benchmarks/bench_cross_entropy.py --device cuda        # + Triton, Liger, CCE
    OMP_NUM_THREADS=1 python benchmarks/bench_cross_entropy.py --shapes gemma3-270m \
        --threads 1 --warmup 0 --repeats 1 \
        --out benchmarks/results/cross_entropy_cpu_gemma3.json      # 262k vocabulary, ~25 min

On the CPU, "liger-torch" is Liger-Kernel's own fused linear cross-entropy (its Python
driver: chunk size, matmuls, gradient accumulation) with its one Triton kernel, the per-chunk
loss and in-place logits gradient, replaced by the same computation in torch through Liger's
implementation registry (`register_op("cross_entropy_loss_and_grad", ...)`): under the Triton
interpreter that kernel takes minutes per 128 rows at a 262k vocabulary.

Timing. CUDA: triton.testing.do_bench (median). CPU: wall clock of whole iterations after one
warm-up, median over --repeats; forward is timed with grad enabled (a training forward: the
torch path and Liger compute the gradient there), backward is the backward call that follows.
On CUDA, backward = (forward+backward) - forward, since eager-gradient implementations cannot
replay a backward.

Peak memory. CUDA: torch.cuda.max_memory_allocated over one forward+backward, minus the
inputs. CPU: torch has no CPU peak counter and tracemalloc does not see its allocations, so
each measurement runs in a fresh subprocess that builds the inputs, resets the kernel's
resident-set high-water mark (echo 5 > /proc/self/clear_refs), runs one forward+backward and
reads VmHWM - VmRSS (Linux). glibc is told to mmap every block >= 64 KiB
(MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS at once and the high-water mark tracks
live tensors. Both figures include the gradient buffers (grad_hidden, grad_weight), which any
implementation must produce; the JSON also gives them separately.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100
# name: (hidden H, vocab V, N on CUDA, N on CPU). The 7-8B shapes use a smaller N on the CPU:
# one naive forward+backward at N=16k would take minutes and ~25 GB there.
SHAPES = {
    "smollm2": (576, 49_152, 16_384, 8_192),
    "mistral-7b": (4096, 32_000, 16_384, 1_024),
    "llama-3-8b": (4096, 128_256, 16_384, 512),
    # Gemma-3 270M: the logits of one 2,048-token micro-batch (train.max_tokens) alone are
    # 262,144 x 2,048 x 4 bytes = 2 GiB in fp32, 3.2x its 168M-parameter lm_head.
    "gemma3-270m": (640, 262_144, 16_384, 2_048),
}
RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------ the contenders
def naive(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(h @ w.T, y, ignore_index=IGNORE, reduction="sum")


def contenders(device: str) -> tuple[dict[str, Callable], dict[str, str]]:
    """The implementations runnable here, and why the others are missing."""
    from ssrengine.kernels import fused_linear_cross_entropy

    def ours(impl: str, grad_filter: bool = False) -> Callable:
        return lambda h, w, y: fused_linear_cross_entropy(
            h, w, y, impl=impl, validate=False, grad_filter=grad_filter
        )

    fns: dict[str, Callable] = {"naive": naive, "ssr-torch": ours("torch"),
                                "ssr-torch-filter": ours("torch", True)}  # fmt: skip
    skipped: dict[str, str] = {}
    if device != "cuda":
        reason = "GPU only: under the CPU Triton interpreter its timing means nothing"
        try:
            fns["liger-torch"] = liger_torch()
        except ImportError as e:
            skipped["liger-torch"] = f"not importable: {e}"
        return fns, {**skipped, "ssr-triton": reason, "ssr-triton-filter": reason,
                     "liger": reason, "cut-cross-entropy": reason}  # fmt: skip
    fns["ssr-triton"] = ours("triton")
    fns["ssr-triton-filter"] = ours("triton", True)  # gradient filtering (train.loss_grad_filter)
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction as Liger,
        )

        fns["liger"] = lambda h, w, y: Liger.apply(h, w, y, None, None, IGNORE, 0.0, 0.0, "sum")[0]
    except ImportError as e:
        skipped["liger"] = f"not importable: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        fns["cut-cross-entropy"] = lambda h, w, y: linear_cross_entropy(
            h, w, y, ignore_index=IGNORE, reduction="sum"
        )
    except ImportError as e:
        skipped["cut-cross-entropy"] = f"not importable: {e}"
    return fns, skipped


def _liger_ce_torch(logits, target, ce_weight, ignore_index, lse_square_scale,
                    label_smoothing, reduction, softcap, n_non_ignore, sum_non_ignore_weight,
                    weight_sum, return_z_loss, return_token_accuracy, return_predicted_tokens,
                    has_gradients, *, mode=None):  # fmt: skip
    """Liger's per-chunk primitive ``cross_entropy_loss_and_grad`` in torch, with its contract
    (liger_kernel/ops/backends/_triton/cross_entropy.py): per-row fp32 loss, and the gradient
    of the chunk's loss written in place into ``logits`` (softmax - one-hot; zero on ignored
    rows; divided by the non-ignored count for reduction "mean"). Plain cross-entropy only."""
    if ce_weight is not None or lse_square_scale or label_smoothing or softcap is not None:
        raise NotImplementedError("liger-torch: plain cross-entropy only")
    if return_z_loss or return_token_accuracy or return_predicted_tokens:
        raise NotImplementedError("liger-torch: no z-loss or token metrics")
    keep = target != ignore_index
    rows = keep.nonzero().flatten()
    y = target[rows]
    lse = torch.logsumexp(logits.float(), dim=-1)
    loss = torch.zeros(len(target), dtype=torch.float32, device=logits.device)
    loss[rows] = lse[rows] - logits[rows, y].float()
    if has_gradients:
        logits.sub_(lse[:, None].to(logits.dtype)).exp_()  # softmax, in place as Liger's kernel
        logits[rows, y] -= 1.0
        logits[~keep] = 0.0
        if reduction == "mean":
            logits.div_(max(n_non_ignore, 1))
    if reduction == "mean":
        loss /= max(n_non_ignore, 1)
    return loss, None, None, None, logits


def liger_torch() -> Callable:
    """Liger-Kernel's fused linear cross-entropy driven through its implementation registry
    with `_liger_ce_torch` as the per-chunk primitive (see the module doc)."""
    from liger_kernel.backends import Capability, register_op
    from liger_kernel.backends.registry import get_registered
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction as Liger,
    )

    if get_registered("cross_entropy_loss_and_grad", "cpu-torch") is None:
        register_op("cross_entropy_loss_and_grad", impl_name="cpu-torch",
                    capability=Capability(), modes=("default",), default_mode="default",
                    preference_rank=1000)(_liger_ce_torch)  # fmt: skip

    def fn(h, w, y):
        out = Liger.apply(h, w, y, None, None, IGNORE, 0.0, 0.0, "sum", None, False, None,
                          False, False, False, "cpu-torch")  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return fn


def make_inputs(n: int, hdim: int, vocab: int, ignored: float, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device, dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.randperm(n, generator=g)[: round(ignored * n)]] = IGNORE
    return h.requires_grad_(), w.requires_grad_(), y.to(device)


def agreement(fn: Callable, hdim: int, vocab: int, ignored: float, dtype, device: str,
              n: int = 16) -> dict:  # fmt: skip
    """``fn``'s loss and gradients against naive's on n rows of the shape: the relative error
    of the loss and the largest gradient error relative to naive's largest gradient entry. A
    contender that computes something else must not get a timing."""
    got, want = [], []
    for f, out in ((fn, got), (naive, want)):
        h, w, y = make_inputs(n, hdim, vocab, ignored, dtype, device, seed=1)
        loss = f(h, w, y)
        loss.backward()
        out += [loss.detach().float(), h.grad.float(), w.grad.float()]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))  # noqa: E731
    return dict(loss=rel(got[0], want[0]), grad_h=rel(got[1], want[1]), grad_w=rel(got[2], want[2]))


# Largest relative error `agreement` lets through, by dtype (the loss is a sum over rows).
AGREEMENT_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


# ----------------------------------------------------------------------------------- timing
def time_cpu(fn: Callable, h, w, y, repeats: int, warmup: int) -> dict:
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        h.grad = w.grad = None
        gc.collect()
        t0 = time.perf_counter()
        loss = fn(h, w, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    tot = [a + b for a, b in zip(fwd, bwd)]
    med = statistics.median
    return {"fwd_ms": 1e3 * med(fwd), "bwd_ms": 1e3 * med(bwd), "fwd_bwd_ms": 1e3 * med(tot),
            "fwd_bwd_ms_all": [round(1e3 * t, 1) for t in tot]}  # fmt: skip


def time_cuda(fn: Callable, h, w, y) -> dict:
    from triton.testing import do_bench

    def fwd_bwd():
        fn(h, w, y).backward()

    kw = dict(grad_to_none=[h, w], return_mode="median")
    fwd = do_bench(lambda: fn(h, w, y), **kw)
    tot = do_bench(fwd_bwd, **kw)
    return {"fwd_ms": fwd, "bwd_ms": max(tot - fwd, 0.0), "fwd_bwd_ms": tot}


# ----------------------------------------------------------------------------------- memory
def memory_cuda(fn: Callable, h, w, y) -> int:
    h.grad = w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(h, w, y).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(spec: dict) -> None:
    """Runs in a fresh process: one forward+backward, peak RSS above the inputs."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fns, _ = contenders("cpu")
    dtype = getattr(torch, spec["dtype"])
    h, w, y = make_inputs(spec["n"], spec["H"], spec["V"], spec["ignored"], dtype, "cpu")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status("VmRSS")
    fns[spec["impl"]](h, w, y).backward()
    print(json.dumps({"peak_extra_bytes": _proc_status("VmHWM") - base}))


def _accum_child(spec: dict) -> None:
    """Fresh process: fp32 master weights, ``steps`` micro-batches of forward+backward under
    bf16 autocast accumulating into .grad (the trainer's gradient accumulation); peak RSS above
    the inputs."""
    from ssrengine.kernels import fused_linear_cross_entropy

    h, w, y = make_inputs(spec["n"], spec["H"], spec["V"], spec["ignored"], torch.float32, "cpu")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _proc_status("VmRSS")
    for _ in range(spec["steps"]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, y, impl="torch", validate=False)
        loss.backward()
    print(json.dumps({"peak_extra_bytes": _proc_status("VmHWM") - base}))


def accumulation_memory(n: int, hdim: int, vocab: int, steps: int, ignored: float = 0.6) -> dict:
    """Peak extra RSS of the torch path over ``steps`` accumulated micro-batches under bf16
    autocast (CPU), against the fp32 gradient buffers any implementation keeps."""
    spec = dict(n=n, H=hdim, V=vocab, ignored=ignored, steps=steps)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--accum-child", json.dumps(spec)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
    grads = (n + vocab) * hdim * 4  # fp32 .grad of hidden and weight
    return dict(**spec, peak_extra_bytes=peak, fp32_grad_bytes=grads, ratio=round(peak / grads, 3))


def memory_cpu(impl: str, n: int, hdim: int, vocab: int, ignored: float, dtype: str) -> int:
    spec = dict(impl=impl, n=n, H=hdim, V=vocab, ignored=ignored, dtype=dtype,
                threads=torch.get_num_threads())  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ------------------------------------------------------------------------------------- main
def main(
    shapes: list[str],
    n: int | None = None,
    ignored: float = 0.6,
    device: str = "cpu",
    dtype: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    memory: bool = True,
    impls: list[str] | None = None,
    out: Path | None = None,
) -> dict:
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    fns, skipped = contenders(device)
    if impls:
        fns = {k: v for k, v in fns.items() if k in impls}
    rows, notes = [], []
    load_before = os.getloadavg()  # the CPU machines are shared: record how busy they were
    for name in shapes:
        hdim, vocab, n_cuda, n_cpu = SHAPES[name]
        n_here = n or (n_cuda if device == "cuda" else n_cpu)
        if device != "cuda" and n is None and n_cpu < n_cuda:
            notes.append(f"{name}: N={n_cpu} on the CPU instead of {n_cuda} (runtime, RAM)")
        esize = torch.finfo(getattr(torch, dtype)).bits // 8
        grad_bytes = (n_here + vocab) * hdim * esize
        for impl, fn in fns.items():
            agree = agreement(fn, hdim, vocab, ignored, getattr(torch, dtype), device)
            if max(agree.values()) > AGREEMENT_TOL[dtype]:
                raise SystemExit(f"{impl} disagrees with naive at {name}: {agree}")
            h, w, y = make_inputs(n_here, hdim, vocab, ignored, getattr(torch, dtype), device)
            extra = {}
            if device == "cuda":
                timing = time_cuda(fn, h, w, y)
                peak = memory_cuda(fn, h, w, y) if memory else None
                extra["loss"] = float(fn(h, w, y).detach())  # same inputs for every impl
            else:
                timing = time_cpu(fn, h, w, y, repeats, warmup)
                del h, w, y
                gc.collect()
                peak = memory_cpu(impl, n_here, hdim, vocab, ignored, dtype) if memory else None
            row = dict(shape=name, H=hdim, V=vocab, N=n_here, supervised=round(n_here * (1 - ignored)),
                       impl=impl, **timing, peak_extra_bytes=peak, grad_bytes=grad_bytes,
                       agreement=agree, **extra)  # fmt: skip
            rows.append(row)
            print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                              for k, v in row.items()}), flush=True)  # fmt: skip
    result = dict(
        device=_device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
        dtype=dtype, ignored=ignored, reduction="sum", skipped=skipped, notes=notes,
        load_average_1min=dict(start=load_before[0], end=os.getloadavg()[0]),
        timing=("triton.testing.do_bench median; bwd = fwd_bwd - fwd" if device == "cuda" else
                f"wall clock, median of {repeats} after {warmup} warm-up; fwd with grad enabled"),
        memory=("torch.cuda.max_memory_allocated minus inputs" if device == "cuda" else
                "VmHWM - VmRSS in a fresh subprocess per measurement (clear_refs reset, "
                "MALLOC_MMAP_THRESHOLD_=65536); includes grad buffers"),
        results=rows, summary=_summary(rows),
    )  # fmt: skip
    out = out or RESULTS / f"cross_entropy_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _summary(rows: list[dict]) -> list[dict]:
    """Each implementation relative to naive at the same shape (time and memory ratios)."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["shape"] == r["shape"] and b["impl"] == "naive"), None)
        if base is None or r["impl"] == "naive":
            continue
        s = dict(shape=r["shape"], N=r["N"], impl=r["impl"],
                 time_vs_naive=round(r["fwd_bwd_ms"] / base["fwd_bwd_ms"], 3))  # fmt: skip
        if r["peak_extra_bytes"] and base["peak_extra_bytes"]:
            s["memory_vs_naive"] = round(r["peak_extra_bytes"] / base["peak_extra_bytes"], 4)
            s["memory_vs_grad_buffers"] = round(r["peak_extra_bytes"] / r["grad_bytes"], 3)
            # Beyond the gradient buffers both must produce: the logits-related memory.
            extra, base_extra = (x["peak_extra_bytes"] - x["grad_bytes"] for x in (r, base))
            if base_extra > 0:
                s["memory_beyond_grads_vs_naive"] = round(max(extra, 0) / base_extra, 4)
        out.append(s)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(4 * len(shapes), 8), 7), squeeze=False)
    panels = [("fwd_bwd_ms", "forward+backward (ms)"), ("peak_extra_bytes", "peak extra (MiB)")]
    for col, shape in enumerate(shapes):
        by_impl = {r["impl"]: r for r in rows if r["shape"] == shape}
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            scale = 2**-20 if key == "peak_extra_bytes" else 1.0
            vals = [(by_impl[i].get(key) or 0) * scale if i in by_impl else 0 for i in impls]
            bars = ax.bar(impls, vals, color=[f"C{k}" for k in range(len(impls))])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            if key == "peak_extra_bytes":  # what any implementation must allocate
                grad = next(iter(by_impl.values()))["grad_bytes"] * scale
                ax.axhline(grad, color="k", ls="--", lw=1, label="grad buffers")
                ax.legend(fontsize=8)
            n = next(iter(by_impl.values()))["N"]
            ax.set_title(f"{shape}, N={n}" if row == 0 else "", fontsize=10)
            ax.set_ylabel(label if col == 0 else "")
            ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"linear cross-entropy, {result['dtype']}, {int(100 * result['ignored'])}% "
                 f"ignored, reduction sum — {result['device']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--n", type=int, help="tokens per batch (default: per shape and device)")
    p.add_argument("--ignored", type=float, default=0.6, help="fraction of ignored tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impls", help="comma list to run a subset (default: all available)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--accumulation-memory", type=int, metavar="K",
        help="instead: peak memory of K micro-batches under bf16 autocast, fp32 master weights",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--accum-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(json.loads(a.child))
    if a.accum_child:
        return _accum_child(json.loads(a.accum_child))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.accumulation_memory:
        hdim, vocab, _, n_cpu = SHAPES[a.shapes.split(",")[0]]
        return print(
            json.dumps(accumulation_memory(a.n or n_cpu, hdim, vocab, a.accumulation_memory))
        )
    main(a.shapes.split(","), a.n, a.ignored, a.device, a.dtype, a.repeats, a.warmup,
         not a.no_memory, a.impls.split(",") if a.impls else None, a.out)  # fmt: skip


if __name__ == "__main__":
    cli()
