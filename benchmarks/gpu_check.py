"""`make gpu-check`: the GPU paths validated on one CUDA GPU in one command (under 8 minutes).

1. `pytest -m gpu`: compiled Triton kernels (interpreter off), FlashAttention-2 varlen against
   examples run alone, the packed training step without per-layer host syncs
   (`torch.cuda.set_sync_debug_mode`), the SGLang engine and server where SGLang is installed.
2. The cross-entropy benchmark in bf16 at SmolLM2 (H 576, V 49,152) and Llama-3-8B (H 4096,
   V 128,256) shapes, N = 16,384 with 60% ignored: naive torch, ours (torch path and Triton,
   each with and without gradient filtering, train.loss_grad_filter), Liger-Kernel and
   cut-cross-entropy when importable; every loss is checked against naive.
3. A short SSR run on SmolLM2 in bf16 with FlashAttention-2, the Triton loss and packing
   (configs/demo.toml: generate, judge, build, 12 optimizer steps); its loss must be finite and
   its metrics carry MFU where the GPU is in ssrengine.models.flops.PEAK_FLOPS.

Writes benchmarks/results/gpu_check.json and gpu_check.png and exits 1 if any step failed
(each step runs in its own process with a time limit; a failed step does not stop the others).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_SHAPES = ("smollm2", "llama-3-8b")
# Per step: seconds, summing to under 8 minutes with room for start-up.
LIMITS = {"pytest_gpu": 210, "cross_entropy": 100, "ssr_run": 150}
# Naive bf16 cross-entropy at Llama-3-8B's vocabulary holds ~13 GB of logits and their fp32
# softmax at N = 16,384: on GPUs under 40 GiB (L4, A10) the benchmark uses N = 4,096.
SMALL_GPU_BYTES = 40 * 2**30


def _run(name: str, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one step; its outcome, wall time and the tail of its output."""
    t0 = time.perf_counter()
    env = {**os.environ, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMITS[name]
        )
        ok, rc, out = proc.returncode == 0, proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, rc = False, None
        out = f"{(e.stdout or b'').decode(errors='replace')}\ntimed out after {LIMITS[name]} s"
    tail = "\n".join(out.strip().splitlines()[-25:])
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not ok:
        print(tail, flush=True)
    return dict(ok=ok, returncode=rc, seconds=round(time.perf_counter() - t0, 1), tail=tail)


def pytest_gpu() -> dict:
    return _run("pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs"])


def cross_entropy(work: Path, gpu_bytes: int) -> tuple[dict, dict | None]:
    out = work / "cross_entropy.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench_cross_entropy.py"), "--device", "cuda",
        "--dtype", "bfloat16", "--shapes", ",".join(BENCH_SHAPES), "--out", str(out),
    ]  # fmt: skip
    if gpu_bytes < SMALL_GPU_BYTES:
        cmd += ["--n", "4096"]
    step = _run("cross_entropy", cmd)
    if not step["ok"]:
        return step, None
    result = json.loads(out.read_text())
    step["loss_check"] = _check_losses(result)
    step["ok"] = all(c["ok"] for c in step["loss_check"])
    return step, result


def _check_losses(result: dict) -> list[dict]:
    """Every contender's loss against naive bf16 at the same shape and inputs: within 1%
    (bf16 naive itself rounds the logits to 8 bits of mantissa)."""
    checks = []
    for r in result["results"]:
        base = next(
            b for b in result["results"] if b["shape"] == r["shape"] and b["impl"] == "naive"
        )
        if "loss" not in r or "loss" not in base or r is base:
            continue
        rel = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-6)
        checks.append(dict(shape=r["shape"], impl=r["impl"], rel_diff=rel, ok=rel < 1e-2))
    return checks


def ssr_run(work: Path) -> tuple[dict, list[dict]]:
    run_dir = work / "ssr"
    cmd = [
        sys.executable, "-m", "ssrengine.train", "--config", "configs/demo.toml",
        f"--run.dir={run_dir}", "--train.dtype=bfloat16", "--train.loss_impl=triton",
        "--train.packing=true", "--model.attn_implementation=flash_attention_2",
    ]  # fmt: skip
    step = _run("ssr_run", cmd)
    metrics_path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        if metrics_path.exists()
        else []
    )
    finite = bool(rows) and all(math.isfinite(r["loss"]) for r in rows)
    step["steps"], step["finite_loss"] = len(rows), finite
    mfus = [r["mfu"] for r in rows[1:] if r.get("mfu") is not None]  # step 1 holds warm-up
    step["mfu_median"] = sorted(mfus)[len(mfus) // 2] if mfus else None
    step["ok"] = step["ok"] and finite
    return step, rows


def plot(report: dict, bench: dict | None, metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BENCH_SHAPES) + 1, figsize=(5 * (len(BENCH_SHAPES) + 1), 4))
    for ax, shape in zip(axes, BENCH_SHAPES):
        rows = [r for r in (bench or {}).get("results", []) if r["shape"] == shape]
        bars = ax.bar([r["impl"] for r in rows], [r["fwd_bwd_ms"] for r in rows])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(f"cross-entropy fwd+bwd (ms), bf16, {shape}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax = axes[-1]
    if metrics:
        ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], marker="o")
    ax.set_title("SSR run, SmolLM2 bf16 + FA2 + Triton loss + packing: loss", fontsize=9)
    ax.set_xlabel("optimizer step")
    fig.suptitle(f"make gpu-check on {report['device']}: {'PASS' if report['ok'] else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        steps = {"pytest_gpu": pytest_gpu()}
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
        steps["cross_entropy"], bench = cross_entropy(work, gpu_bytes)
        steps["ssr_run"], metrics = ssr_run(work)
    report = dict(
        device=torch.cuda.get_device_name(0),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        torch=torch.__version__,
        ok=all(s["ok"] for s in steps.values()),
        seconds=round(time.perf_counter() - t0, 1),
        steps=steps,
        cross_entropy=bench,
        ssr_metrics=metrics,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, bench, metrics, args.out.with_suffix(".png"))
    print(
        f"wrote {args.out} and {args.out.with_suffix('.png')}: {'PASS' if report['ok'] else 'FAIL'}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
