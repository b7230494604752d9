"""`make gpu-check`: the GPU paths validated on one CUDA GPU in one command; any failure fails it.

1. `pytest -m gpu` (compiled Triton kernels, FlashAttention-2 varlen, the packed step without
   host syncs, inference precision, the SGLang engine and server): a failed test fails the
   step, and so does a skipped test of a required component (everything but SGLang: flash-attn,
   Triton, the fused loss...); SGLang's tests are optional and listed as not run.
2. The cross-entropy benchmark in bf16 (N = 16,384, 60% ignored; 4,096 on GPUs under 40 GiB):
   naive torch, ours (torch path and Triton, with and without gradient filtering), Liger-Kernel
   and cut-cross-entropy when importable; every loss within 1% of naive bf16.
3. A short SSR run on SmolLM2 in bf16 with FlashAttention-2, the Triton loss and packing
   (configs/demo.toml: generate, judge, build, 12 optimizer steps): the loss finite and
   falling (the last three steps' mean below the first three's), its MFU above the GPU's floor
   (`MFU_FLOORS`), its peak GPU memory recorded.
4. The final checkpoint reloads with transformers' `from_pretrained` and generates.

Each step runs in its own process group under a time limit; on a timeout the whole group is
killed (an SGLang server's children each hold 40% of the GPU's memory and would starve the next
step), and so are leftovers of a step that ended. `--quick` (`make gpu-check-quick`) leaves out
SGLang and the Llama-3-8B benchmark shape and holds the whole check, set-up included, to
`QUICK_SECONDS` (8 minutes on one warm H100; a step that would run past it gets what is left
and fails if that is not enough). One summary table ends the output (what ran, what passed,
tokens/s, MFU, peak memory); benchmarks/results/gpu_check.json and .png keep the details.
Exit status 1 on any failure, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_SHAPES = ("smollm2", "llama-3-8b")
QUICK_SHAPES = ("smollm2",)
# Per step, seconds. The quick tier also holds all of it to QUICK_SECONDS.
LIMITS = {"pytest_gpu": 240, "cross_entropy": 100, "ssr_run": 150, "reload": 60}
QUICK_LIMITS = {"pytest_gpu": 150, "cross_entropy": 60, "ssr_run": 150, "reload": 45}
QUICK_SECONDS = 8 * 60
# Naive bf16 cross-entropy at Llama-3-8B's vocabulary holds ~13 GB of logits and their fp32
# softmax at N = 16,384: on GPUs under 40 GiB (L4, A10) the benchmark uses N = 4,096.
SMALL_GPU_BYTES = 40 * 2**30
# A skipped GPU test is optional when its file or reason names one of these: SGLang has its
# own environment (docs/generation.md). Every other skip is a required component missing.
OPTIONAL = ("sglang", "test_backends_gpu")
# The lowest MFU the SSR run may show, per GPU (first match of the name, as in
# ssrengine.models.flops.PEAK_FLOPS): a guard against work falling off the tensor cores (fp32 on
# CUDA cores, the loss on the CPU, a host sync per layer), not a target. SmolLM2-135M's
# matmuls are small ([tokens, 576] x [576, 1536]), so a healthy run sits far below a large
# model's MFU. Unmeasured: set before any GPU ran this check, to be raised from its results.
MFU_FLOORS = (
    ("H100", 0.02), ("H200", 0.02), ("GH200", 0.02), ("A100", 0.03), ("L40S", 0.03),
    ("L40", 0.03), ("L4", 0.04), ("A10", 0.04), ("RTX 4090", 0.03), ("RTX 3090", 0.04),
    ("RTX A6000", 0.03),
)  # fmt: skip
DEFAULT_MFU_FLOOR = 0.02


# ----------------------------------------------------------------------------- running a step
class Clock:
    """The time left to the whole check (None: no deadline)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def limit(self, step_limit: float) -> float:
        if self.end is None:
            return step_limit
        return max(1.0, min(step_limit, self.end - time.monotonic()))


def kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_step(name: str, cmd: list[str], limit: float, env: dict[str, str] | None = None) -> dict:
    """Run one step in a process group of its own: its outcome, wall time and output tail.
    On a timeout the whole group is killed; so is any process the step left behind."""
    t0 = time.perf_counter()
    env = {**os.environ, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    with tempfile.TemporaryFile(mode="w+") as log:
        # Output to a file, not a pipe: a grandchild holding a pipe open would keep the read
        # waiting after the step itself has ended.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        kill_group(proc.pid)  # the step's leftovers too (an SGLang server, its workers)
        proc.wait()
        log.seek(0)
        out = log.read()
    if timed_out:
        out += f"\ntimed out after {limit:.0f} s: process group killed"
    ok = rc == 0
    tail = "\n".join(out.strip().splitlines()[-25:])
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not ok:
        print(tail, flush=True)
    return dict(
        ok=ok, returncode=rc, timed_out=timed_out,
        seconds=round(time.perf_counter() - t0, 1), tail=tail, output=out,
    )  # fmt: skip


def last_json(output: str) -> dict | None:
    """The last line of ``output`` that is a JSON object."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# ---------------------------------------------------------------------------------- pytest
def junit_outcomes(xml_text: str) -> list[dict]:
    """Each test case of a pytest junit XML: its id, outcome (passed, failed, error, skipped)
    and, for a skip, the reason."""
    out = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                reason = child.get("message", "") or (child.text or "")
        out.append(dict(test=test, outcome=outcome, reason=reason.strip()))
    return out


def is_optional(outcome: dict) -> bool:
    text = f"{outcome['test']} {outcome['reason']}".lower()
    return any(k in text for k in OPTIONAL)


def judge_tests(outcomes: list[dict], returncode: int | None) -> dict:
    """The pytest step's verdict: no failure or error, at least one test run, and no skipped
    test of a required component (optional skips are listed as not run)."""
    count = {k: sum(o["outcome"] == k for o in outcomes) for k in ("passed", "failed", "error")}
    skipped = [o for o in outcomes if o["outcome"] == "skipped"]
    required = [o for o in skipped if not is_optional(o)]
    optional = [o for o in skipped if is_optional(o)]
    problems = []
    if returncode not in (0,):
        problems.append(f"pytest exited with {returncode}")
    if count["failed"] or count["error"]:
        problems.append(f"{count['failed']} failed, {count['error']} errors")
    if not count["passed"]:
        problems.append("no GPU test passed")
    problems += [f"required test skipped: {o['test']} ({o['reason']})" for o in required]
    return dict(
        ok=not problems, problems=problems, **count,
        not_run=[f"{o['test']} ({o['reason']})" for o in optional],
    )  # fmt: skip


def pytest_gpu(work: Path, quick: bool, clock: Clock) -> dict:
    xml = work / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", f"--junitxml={xml}"]
    if quick:
        cmd.append("--ignore=tests/test_backends_gpu.py")  # SGLang: listed as not run
    limits = QUICK_LIMITS if quick else LIMITS
    step = run_step("pytest_gpu", cmd, clock.limit(limits["pytest_gpu"]))
    outcomes = junit_outcomes(xml.read_text()) if xml.exists() else []
    verdict = judge_tests(outcomes, step["returncode"])
    if quick:
        verdict["not_run"].append("tests/test_backends_gpu.py (SGLang: not in the quick tier)")
    step.update(verdict)
    for p in verdict["problems"]:
        print(f"  {p}", flush=True)
    return step


# ---------------------------------------------------------------------------- cross-entropy
def cross_entropy(
    work: Path, gpu_bytes: int, quick: bool, clock: Clock
) -> tuple[dict, dict | None]:
    out = work / "cross_entropy.json"
    shapes = QUICK_SHAPES if quick else BENCH_SHAPES
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench_cross_entropy.py"), "--device", "cuda",
        "--dtype", "bfloat16", "--shapes", ",".join(shapes), "--out", str(out),
    ]  # fmt: skip
    if gpu_bytes < SMALL_GPU_BYTES:
        cmd += ["--n", "4096"]
    limits = QUICK_LIMITS if quick else LIMITS
    step = run_step("cross_entropy", cmd, clock.limit(limits["cross_entropy"]))
    if not step["ok"] or not out.exists():
        step["ok"] = False
        return step, None
    result = json.loads(out.read_text())
    step["loss_check"] = check_losses(result)
    step["ok"] = bool(step["loss_check"]) and all(c["ok"] for c in step["loss_check"])
    return step, result


def check_losses(result: dict) -> list[dict]:
    """Every contender's loss against naive bf16 at the same shape and inputs: within 1%
    (bf16 naive itself rounds the logits to 8 bits of mantissa)."""
    checks = []
    for r in result["results"]:
        base = next(
            (b for b in result["results"] if b["shape"] == r["shape"] and b["impl"] == "naive"),
            None,
        )
        if base is None or r is base or "loss" not in r or "loss" not in base:
            continue
        rel = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-6)
        checks.append(dict(shape=r["shape"], impl=r["impl"], rel_diff=rel, ok=rel < 1e-2))
    return checks


# ------------------------------------------------------------------------------ the SSR run
# Runs the trainer's entry point and prints the process's peak GPU memory at the end.
_PEAK = (
    "import json, runpy, sys, torch\n"
    "sys.argv = ['ssrengine.train', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('ssrengine.train', run_name='__main__')\n"
    "finally:\n"
    "    print(json.dumps({'peak_gpu_bytes': torch.cuda.max_memory_allocated()}), flush=True)\n"
)


def ssr_command(run_dir: Path) -> list[str]:
    return [
        sys.executable, "-c", _PEAK, "--config", "configs/demo.toml", f"--run.dir={run_dir}",
        "--train.dtype=bfloat16", "--train.loss_impl=triton", "--train.packing=true",
        "--model.attn_implementation=flash_attention_2",
        # larger micro-batches than the CPU demo (MFU means something) and a learning rate at
        # which 12 steps over ~2.5 epochs of the 64 examples show the loss falling
        "--train.max_tokens=4096", "--train.lr=1e-4",
    ]  # fmt: skip


def mfu_floor(device_name: str) -> float:
    return next((f for key, f in MFU_FLOORS if key in device_name), DEFAULT_MFU_FLOOR)


def judge_run(rows: list[dict], device_name: str) -> dict:
    """The SSR run's metrics: finite loss, falling (mean of the last three steps below the
    first three's), median MFU (the first step holds warm-up and compiles) above the GPU's
    floor; a GPU with no peak in the table has no MFU, which is reported, not failed."""
    problems = []
    losses = [r["loss"] for r in rows]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    if not rows:
        problems.append("no metrics rows")
    elif not finite:
        problems.append("non-finite loss")
    first, last = losses[:3], losses[-3:]
    falls = len(losses) >= 6 and finite and sum(last) / 3 < sum(first) / 3
    if rows and finite and not falls:
        problems.append(f"loss did not fall: first steps {first}, last steps {last}")
    mfus = sorted(r["mfu"] for r in rows[1:] if r.get("mfu") is not None)
    mfu = mfus[len(mfus) // 2] if mfus else None
    tps = sorted(r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s"))
    floor = mfu_floor(device_name)
    if mfu is not None and mfu < floor:
        problems.append(f"MFU {mfu:.3f} below the floor {floor} for {device_name}")
    return dict(
        ok=not problems, problems=problems, steps=len(rows), finite_loss=finite,
        loss_falls=falls, mfu_median=mfu, mfu_floor=floor,
        tokens_per_s_median=tps[len(tps) // 2] if tps else None,
        mfu_note=None if mfu is not None else f"no peak FLOP/s known for {device_name}",
    )  # fmt: skip


def ssr_run(work: Path, device_name: str, quick: bool, clock: Clock) -> tuple[dict, list[dict]]:
    run_dir = work / "ssr"
    limits = QUICK_LIMITS if quick else LIMITS
    step = run_step("ssr_run", ssr_command(run_dir), clock.limit(limits["ssr_run"]))
    metrics_path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        if metrics_path.exists()
        else []
    )
    verdict = judge_run(rows, device_name)
    peak = last_json(step["output"]) or {}
    step.update(verdict, peak_gpu_bytes=peak.get("peak_gpu_bytes"))
    step["ok"] = step["ok"] and verdict["ok"]
    for p in verdict["problems"]:
        print(f"  {p}", flush=True)
    return step, rows


_RELOAD = (
    "import json, sys, torch\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "path = sys.argv[1]\n"
    "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()\n"
    "tok = AutoTokenizer.from_pretrained(path)\n"
    "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is 2 + 2?'}],\n"
    "    add_generation_prompt=True, return_tensors='pt', return_dict=True).to('cuda')\n"
    "out = model.generate(**ids, max_new_tokens=8, do_sample=False)\n"
    "logits = model(**ids).logits\n"
    "print(json.dumps({'new_tokens': out.shape[1] - ids['input_ids'].shape[1],\n"
    "    'finite': bool(torch.isfinite(logits).all())}))\n"
)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(
        (p for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    return steps[-1] if steps else None


def reload(work: Path, quick: bool, clock: Clock) -> dict:
    ckpt = latest_checkpoint(work / "ssr")
    if ckpt is None:
        print("[FAILED] reload: the SSR run left no checkpoint", flush=True)
        return dict(ok=False, seconds=0.0, problems=["no checkpoint to reload"])
    limits = QUICK_LIMITS if quick else LIMITS
    step = run_step("reload", [sys.executable, "-c", _RELOAD, str(ckpt)], clock.limit(limits["reload"]))  # fmt: skip
    got = last_json(step["output"]) or {}
    step["checkpoint"] = ckpt.name
    step["ok"] = step["ok"] and got.get("new_tokens", 0) > 0 and got.get("finite") is True
    return step


# ---------------------------------------------------------------------------------- summary
def summary_table(report: dict) -> str:
    """One markdown table: what ran, what passed, tokens/s, MFU, peak memory."""
    steps = report["steps"]

    def res(name: str) -> str:
        s = steps.get(name)
        return "not run" if s is None else ("pass" if s["ok"] else "**FAIL**")

    lines = ["| step | result | seconds | details |", "|---|---|---|---|"]
    t = steps.get("pytest_gpu")
    if t is not None:
        detail = f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed"
        detail += "".join(f"; {p}" for p in t.get("problems", []) if "required" in p)
        if t.get("not_run"):
            detail += f"; not run (optional): {len(t['not_run'])}"
        lines.append(f"| pytest -m gpu | {res('pytest_gpu')} | {t['seconds']} | {detail} |")
    c = steps.get("cross_entropy")
    if c is not None:
        checks = c.get("loss_check", [])
        bad = [f"{x['impl']}@{x['shape']}" for x in checks if not x["ok"]]
        detail = f"{len(checks)} losses vs naive bf16" + (f", off: {', '.join(bad)}" if bad else "")
        lines.append(f"| cross-entropy bf16 | {res('cross_entropy')} | {c['seconds']} | {detail} |")
    r = steps.get("ssr_run")
    if r is not None:
        peak = r.get("peak_gpu_bytes")
        mfu = r.get("mfu_median")
        detail = ", ".join([
            f"{r.get('steps', 0)} steps",
            "loss falls" if r.get("loss_falls") else "loss does not fall",
            f"{r['tokens_per_s_median']:.0f} tokens/s" if r.get("tokens_per_s_median") else "tokens/s n/a",
            f"MFU {mfu:.3f} (floor {r.get('mfu_floor')})" if mfu is not None else "MFU n/a",
            f"peak {peak / 2**30:.2f} GiB" if peak else "peak n/a",
        ])  # fmt: skip
        lines.append(f"| SSR run (bf16, FA2, Triton loss) | {res('ssr_run')} | {r['seconds']} | {detail} |")  # fmt: skip
    g = steps.get("reload")
    if g is not None:
        detail = f"from_pretrained({g.get('checkpoint', '?')}) and generate"
        lines.append(f"| checkpoint reload | {res('reload')} | {g['seconds']} | {detail} |")
    head = f"make gpu-check{' (quick)' if report.get('quick') else ''} on {report['device']}"
    verdict = "PASS" if report["ok"] else "FAIL"
    return f"{head}: {verdict} in {report['seconds']} s\n\n" + "\n".join(lines)


def plot(report: dict, bench: dict | None, metrics: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the JSON and the table carry everything; the plot is extra
        print("matplotlib is not installed: no plot", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = QUICK_SHAPES if report.get("quick") else BENCH_SHAPES
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4))
    for ax, shape in zip(axes, shapes):
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
    parser.add_argument("--quick", action="store_true", help="no SGLang, one benchmark shape, 8 minutes in all")  # fmt: skip
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    clock = Clock(QUICK_SECONDS if args.quick else None)
    import torch

    if not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    device = torch.cuda.get_device_name(0)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        steps = {"pytest_gpu": pytest_gpu(work, args.quick, clock)}
        steps["cross_entropy"], bench = cross_entropy(work, gpu_bytes, args.quick, clock)
        steps["ssr_run"], metrics = ssr_run(work, device, args.quick, clock)
        steps["reload"] = reload(work, args.quick, clock)
    for s in steps.values():
        s.pop("output", None)  # the tails stay
    report = dict(
        device=device,
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        torch=torch.__version__,
        quick=args.quick,
        ok=all(s["ok"] for s in steps.values()),
        seconds=round(time.perf_counter() - t0, 1),
        steps=steps,
        cross_entropy=bench,
        ssr_metrics=metrics,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, bench, metrics, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}\n")
    print(summary_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
