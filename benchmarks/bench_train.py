"""Benchmark: training speed against the machine's FLOP ceiling, and peak memory with saves.

    python benchmarks/bench_train.py                           # SmolLM2-135M, 1 thread, 4 steps
    python benchmarks/bench_train.py --gradient-checkpointing  # the same, activations recomputed
    python benchmarks/bench_train.py --compile                 # train.compile = true

1. The ceiling: a 2048³ fp32 matmul timed in the same process on the same --threads, before
   training, after every step and at the end (the median counts; the best one is reported
   too: other jobs on a shared machine slow both the matmul and the training). Its FLOP rate divided by the FLOPs per trained token (`ssrengine.models.flops`: 6 × the
   non-embedding parameters per token, the lm_head only for supervised tokens, causal
   attention within each packed example) is the tokens/s no implementation can beat.
2. Training: SmolLM2-135M, fp32, packed micro-batches of --max-tokens (2,048) from the
   embedded data (builtin:train with gold targets), through the real trainer
   (`ssrengine.training.trainer.train`: setup, train_step, the loop, the final checkpoint save). Real
   tokens/s and % of the ceiling come from the steps after --warmup-steps (the first
   allocates the optimizer state; with --compile it also compiles), each both by wall
   clock and by process CPU time: with one thread, CPU time is what an unloaded core would
   take, robust to the load of a shared machine (both in the JSON; the load average too).
3. Step-time breakdown: the trainer's own functions timed in place (data: picking and moving
   micro-batches; forward: model + fused loss; backward; optimizer: clip + AdamW + schedule +
   zero_grad; other: the one host sync and the metrics row).
4. Memory: a thread samples VmRSS from /proc/self/status every 10 ms over the whole run,
   setup and checkpoint save included; VmHWM (the kernel's high-water mark) confirms the peak.

Writes results/train_cpu[-gc][-compile][-fused].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
GB = 1e9


# ------------------------------------------------------------------------------ memory


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class RssSampler(threading.Thread):
    """VmRSS every ``period`` seconds, with the phase the main thread is in."""

    def __init__(self, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.period, self.phase = period, "setup"
        self.hwm: dict[str, int] = {}
        self.samples: list[tuple[float, int, str]] = []
        self._stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter() - self.t0, _status("VmRSS"), self.phase))
            self._stop_event.wait(self.period)

    def set_phase(self, phase: str) -> None:
        """Enter ``phase``: the kernel's high-water mark since the last call is the exact peak
        of the phase left (sampling can miss a short spike); writing 5 to clear_refs resets it."""
        old = self.phase
        self.hwm[old] = max(self.hwm.get(old, 0), _status("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.phase = phase

    def stop(self) -> None:
        self.set_phase("stopped")
        self._stop_event.set()
        self.join()

    def peak(self, phase: str | None = None) -> int:
        vals = [r for _, r, p in self.samples if phase is None or p == phase]
        hwm = [v for p, v in self.hwm.items() if phase is None or p == phase]
        return max(vals + hwm) if vals or hwm else 0


# ------------------------------------------------------------------------------ ceiling


def matmul_rate(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """FLOP/s of an n³ fp32 matmul: best of ``reps``, by wall clock and by process CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    flops = 2.0 * n**3
    return {"wall_flops_per_s": flops / min(walls), "cpu_flops_per_s": flops / min(cpus)}


# ------------------------------------------------------------------------------ timers


class Phases:
    """Wall and CPU seconds per phase, per step: wraps the trainer's functions in place."""

    def __init__(self) -> None:
        self.step: dict[str, list[float]] = defaultdict(float)  # type: ignore[arg-type]
        self.steps: list[dict[str, float]] = []
        self.flops: list[float] = []
        self.ceilings: list[dict[str, float]] = []
        self.depth = 0
        self.save_s = 0.0  # the final checkpoint save
        self.profile: list[dict[str, Any]] | None = None  # top ops of the --profile step

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if self.depth:  # a phase inside a phase counts once, in the outer one
                return fn(*args, **kwargs)
            self.depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step[name] += time.perf_counter() - t0  # type: ignore[operator]
                self.step[name + "_cpu"] += time.process_time() - c0  # type: ignore[operator]
                self.depth -= 1

        return inner


def count_saved(forward: Callable[..., Any], phases: Phases) -> Callable[..., Any]:
    """Wrap CausalLMLoss.forward: record the bytes autograd keeps for the backward (distinct
    storages packed through `saved_tensors_hooks`, parameters excluded) per token and layer.
    Under gradient checkpointing the checkpoint's own hooks take over inside each layer, so
    the count would miss what they keep: not recorded there."""

    def inner(net: Any, mb: Any) -> Any:
        if getattr(net.model, "is_gradient_checkpointing", False):
            return forward(net, mb)
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                kept[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(net, mb)
        layers = net.model.config.num_hidden_layers
        phases.step["saved_bytes"] += sum(kept.values())  # type: ignore[operator]
        phases.step["saved_tokens_layers"] += mb.input_ids.numel() * layers  # type: ignore[operator]
        return out

    return inner


def install(
    phases: Phases,
    sampler: RssSampler,
    shape_of: Callable[[Any], Any],
    profile_step: int = 0,
) -> None:
    """Time the trainer's pieces where they are looked up (module globals, class attributes)."""
    from ssrengine.training import loss, state, trainer

    orig_rank, orig_step, orig_save = (
        trainer.rank_micro_batches,
        trainer.train_step,
        state.Trainer.save,
    )

    def rank_micro_batches(*args: Any, **kwargs: Any) -> Any:
        mbs = orig_rank(*args, **kwargs)
        shape = shape_of(None)
        phases.flops.append(shape.step(mbs))
        return mbs

    trainer.rank_micro_batches = phases.wrap("data", rank_micro_batches)
    loss.to_device = phases.wrap("data", loss.to_device)
    loss.CausalLMLoss.forward = phases.wrap(
        "forward", count_saved(loss.CausalLMLoss.forward, phases)
    )
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = phases.wrap("backward", orig_backward)  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = phases.wrap("optimizer", torch.nn.utils.clip_grad_norm_)

    # Class attributes, patched before the trainer builds them (an instance attribute would
    # land in the scheduler's state_dict and trip LRScheduler's step-order check).
    for cls, attr in (
        (torch.optim.AdamW, "step"),
        (torch.optim.Optimizer, "zero_grad"),
        (torch.optim.lr_scheduler.LRScheduler, "step"),
    ):
        setattr(cls, attr, phases.wrap("optimizer", getattr(cls, attr)))

    def train_step(tr: Any) -> Any:
        shape_of(tr.hf_model)
        sampler.set_phase(f"step {len(phases.steps) + 1}")
        phases.step = defaultdict(float)  # type: ignore[arg-type]
        profiling = len(phases.steps) + 1 == profile_step
        w0, c0 = time.perf_counter(), time.process_time()
        if profiling:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                s = orig_step(tr)
            phases.profile = top_ops(prof, time.perf_counter() - w0)
        else:
            s = orig_step(tr)
        row = dict(phases.step)
        row["wall_s"] = time.perf_counter() - w0
        row["cpu_s"] = time.process_time() - c0
        row["other"] = row["wall_s"] - sum(row.get(k, 0.0) for k in PHASES[:-1])
        row["other_cpu"] = row["cpu_s"] - sum(row.get(k + "_cpu", 0.0) for k in PHASES[:-1])
        row["tokens"] = s.tokens
        row["supervised_tokens"] = s.supervised_tokens
        row["loss"] = s.loss
        phases.steps.append(row)
        sampler.set_phase("loop")
        phases.ceilings.append(matmul_rate(reps=3))  # the ceiling next to every step
        return s

    def save(tr: Any, **extra: Any) -> Any:
        sampler.set_phase("save")
        t0 = time.perf_counter()
        try:
            return orig_save(tr, **extra)
        finally:
            phases.save_s = time.perf_counter() - t0
            sampler.set_phase("end")

    trainer.train_step = train_step
    state.Trainer.save = save  # type: ignore[method-assign]


PHASES = ("data", "forward", "backward", "optimizer", "other")


def top_ops(prof: Any, step_s: float, n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` ops with the most self CPU time in a profiled step, with their share of the
    step's wall time: the profiler's own clock (an op's self time is wall time between its
    start and end on its thread), so a descheduled process does not push the shares past 1."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4),
            "calls": e.count,
            "share_of_step": round(e.self_cpu_time_total / 1e6 / step_s, 4),
        }
        for e in rows[:n]
    ]


# ------------------------------------------------------------------------------ run


def rehearsal_rows(n: int) -> list[Any]:
    from ssrengine.core.rundir import RehearsalRow
    from ssrengine.data.builtin import resolve_data_file
    from ssrengine.data.records import load_examples

    exs = load_examples(resolve_data_file("builtin:train"), max_examples=n)
    return [RehearsalRow.of(e) for e in exs]


def main(a: argparse.Namespace) -> dict[str, Any]:
    from ssrengine.core.config_load import load_config
    from ssrengine.models.flops import ModelFlops
    from ssrengine.training.trainer import train

    torch.set_num_threads(a.threads)
    sampler = RssSampler()
    sampler.start()
    load0 = os.getloadavg()
    ceiling_before = matmul_rate()
    phases = Phases()
    shape_box: list[Any] = []

    def shape_of(model: Any) -> Any:
        if model is not None and not shape_box:
            shape_box.append(ModelFlops.from_config(model.config))
        return shape_box[0]

    install(phases, sampler, shape_of, profile_step=a.steps if a.profile else 0)
    overrides = [
        f"--model.path={a.model}",
        "--model.device=cpu",
        "--train.dtype=float32",
        "--train.packing=true",
        f"--train.max_tokens={a.max_tokens}",
        f"--train.max_steps={a.steps}",
        "--train.grad_accum=1",
        f"--train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        f"--train.optimizer={a.optimizer}",
    ]
    if a.compile:
        overrides.append("--train.compile=true")
    if a.compile_memory_budget is not None:
        overrides.append(f"--train.compile_memory_budget={a.compile_memory_budget}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cfg = load_config(None, [*overrides, f"--run.dir={tmp}"])
        os.environ.setdefault("TQDM_DISABLE", "1")
        t0 = time.perf_counter()
        final = train(cfg, Path(tmp), rows=rehearsal_rows(a.examples))
        total_s = time.perf_counter() - t0
        ckpt_bytes = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    sampler.set_phase("end")
    ceiling_after = matmul_rate()
    load1 = os.getloadavg()
    sampler.stop()
    return report(a, phases, sampler, ceiling_before, ceiling_after, total_s, ckpt_bytes,
                  shape_box[0], [load0, load1])  # fmt: skip


def report(
    a: argparse.Namespace,
    phases: Phases,
    sampler: RssSampler,
    before: dict[str, float],
    after: dict[str, float],
    total_s: float,
    ckpt_bytes: int,
    shape: Any,
    loads: list[tuple[float, float, float]],
) -> dict[str, Any]:
    steps = phases.steps
    warm = min(a.warmup_steps, len(steps) - 1)  # step 1 allocates AdamW state (and compiles)
    steady = steps[warm:]
    idx = range(len(steps) - len(steady), len(steps))
    flops = [phases.flops[i] for i in idx]
    tokens = sum(s["tokens"] for s in steady)
    wall = sum(s["wall_s"] for s in steady)
    cpu = sum(s["cpu_s"] for s in steady)
    # The ceiling: the median of all matmul measurements (before, after each step, after);
    # the best single one is in the JSON too, with the % against it.
    every = [before, *phases.ceilings, after]
    ceil_wall = statistics.median(c["wall_flops_per_s"] for c in every)
    ceil_cpu = statistics.median(c["cpu_flops_per_s"] for c in every)
    best_cpu = max(c["cpu_flops_per_s"] for c in every)
    flops_per_token = sum(flops) / tokens
    dense_params, head_params = round(shape.per_token / 6), round(shape.per_supervised_token / 6)
    n_params = dense_params + head_params
    state_bytes = 16 * n_params  # fp32 weights + grads + two AdamW moments (embedding incl.)
    step_peak = max(sampler.peak(f"step {i + 1}") for i in range(len(steps)))
    rss_before_steps = sampler.peak("setup")
    res = {
        "model": "SmolLM2-135M",
        "dtype": "float32",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before_after": [round(x, 2) for x in (loads[0][0], loads[1][0])],
        "settings": {
            "max_tokens": a.max_tokens,
            "steps": a.steps,
            "examples": a.examples,
            "gradient_checkpointing": a.gradient_checkpointing,
            "compile": a.compile,
            "optimizer": a.optimizer,
            "compile_memory_budget": a.compile_memory_budget,
            "profiled_step": a.steps if a.profile else None,
        },
        "matmul_2048_gflops": {
            "cpu_each": [round(c["cpu_flops_per_s"] / 1e9, 1) for c in every],
            "wall_each": [round(c["wall_flops_per_s"] / 1e9, 1) for c in every],
            "cpu_median": round(ceil_cpu / 1e9, 2),
            "wall_median": round(ceil_wall / 1e9, 2),
        },
        "flops_per_token_g": round(flops_per_token / 1e9, 4),
        "dense_params": dense_params,
        "head_params": head_params,
        "tokens_per_step_mean": round(tokens / len(steady), 1),
        "supervised_share": round(sum(s["supervised_tokens"] for s in steady) / tokens, 3),
        "tokens_per_s_wall": round(tokens / wall, 2),
        "tokens_per_s_cpu": round(tokens / cpu, 2),
        "ceiling_tokens_per_s_wall": round(ceil_wall / flops_per_token, 2),
        "ceiling_tokens_per_s_cpu": round(ceil_cpu / flops_per_token, 2),
        "pct_of_ceiling_wall": round(100 * sum(flops) / wall / ceil_wall, 1),
        "pct_of_ceiling_cpu": round(100 * sum(flops) / cpu / ceil_cpu, 1),
        "pct_of_best_matmul_cpu": round(100 * sum(flops) / cpu / best_cpu, 1),
        "first_step_s": round(steps[0]["wall_s"], 3),
        "warmup_steps": warm,
        # what the warm-up steps cost beyond steady steps: torch.compile's compile time
        "warmup_extra_cpu_s": round(
            sum(s["cpu_s"] for s in steps[:warm]) - warm * cpu / len(steady), 2
        ),
        "breakdown_s_per_step": {
            k: round(statistics.mean(s.get(k, 0.0) for s in steady), 4) for k in PHASES
        },
        "breakdown_cpu_s_per_step": {
            k: round(statistics.mean(s.get(k + "_cpu", 0.0) for s in steady), 4) for k in PHASES
        },
        # Saved for the backward, per token and layer (fp32: floats), steady steps' mean.
        "saved_activation_floats_per_token_layer": saved_per_token_layer(steady),
        "profile_last_step": phases.profile,
        "steps": [{k: round(v, 4) for k, v in s.items()} for s in steps],
        "save_s": round(phases.save_s, 2),
        "total_s": round(total_s, 1),
        "checkpoint_bytes": ckpt_bytes,
        "memory_gb": {
            "peak_rss": round(sampler.peak() / GB, 3),
            "peak_rss_sampled_only": round(max(r for _, r, _ in sampler.samples) / GB, 3),
            "peak_by_phase_vmhwm": {p: round(v / GB, 3) for p, v in sampler.hwm.items()},
            "rss_end_of_setup": round(rss_before_steps / GB, 3),
            "peak_during_steps": round(step_peak / GB, 3),
            "peak_during_save": round(sampler.peak("save") / GB, 3),
            "weights_grads_adamw": round(state_bytes / GB, 3),
            "activations_and_temporaries_est": round(
                (step_peak - rss_before_steps - 12 * n_params) / GB, 3
            ),
        },
        "rss_timeline": thin(sampler.samples),
    }
    out = a.out or RESULTS / (
        "train_cpu"
        + ("-gc" if a.gradient_checkpointing else "")
        + ("-compile" if a.compile else "")
        + ("-fused" if a.optimizer == "adamw_fused" else "")
        + (f"-budget{a.compile_memory_budget}" if a.compile_memory_budget is not None else "")
        + ("-profile" if a.profile else "")
        + ".json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    timeline = res.pop("rss_timeline")
    text = json.dumps(res, indent=2)[:-2]  # the timeline one sample per line, at the end
    rows = ",\n    ".join(json.dumps(x) for x in timeline)
    out.write_text(text + ',\n  "rss_timeline": [\n    ' + rows + "\n  ]\n}\n")
    res["rss_timeline"] = timeline
    plot(res, out.with_suffix(".png"))
    return res


def saved_per_token_layer(steps: list[dict[str, float]]) -> float | None:
    rows = [s for s in steps if s.get("saved_tokens_layers")]
    if not rows:
        return None  # gradient checkpointing: not counted
    return round(
        sum(s["saved_bytes"] for s in rows) / 4 / sum(s["saved_tokens_layers"] for s in rows), 1
    )


def thin(samples: list[tuple[float, int, str]], n: int = 300) -> list[list[Any]]:
    """At most ~``n`` points of the RSS timeline, each bucket's highest sample (peaks kept)."""
    k = max(1, len(samples) // n)
    out = []
    for i in range(0, len(samples), k):
        t, r, p = max(samples[i : i + k], key=lambda s: s[1])
        out.append([round(t, 2), round(r / GB, 3), p])
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    vals = [res["tokens_per_s_cpu"], res["ceiling_tokens_per_s_cpu"]]
    bars = ax.bar(["trained", "FLOP ceiling"], vals, color=["#4c72b0", "#bbbbbb"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(f"tokens per CPU-second: {res['pct_of_ceiling_cpu']}% of ceiling")
    ax = axes[1]
    bd = res["breakdown_cpu_s_per_step"]
    left = 0.0
    colors = ["#8172b3", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for (k, v), c in zip(bd.items(), colors, strict=True):
        ax.barh([0], [v], left=left, color=c, label=f"{k} {v:.2f}s")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("CPU seconds per step")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    ax.set_title("step-time breakdown")
    ax = axes[2]
    tl = res["rss_timeline"]
    ax.plot([t for t, _, _ in tl], [r for _, r, _ in tl], color="#4c72b0")
    saves = [t for t, _, p in tl if p == "save"]
    if saves:
        ax.axvspan(min(saves), max(saves), color="#dd8452", alpha=0.3, label="checkpoint save")
    ax.axhline(5.0, color="#c44e52", ls="--", lw=1, label="5 GB target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GB)")
    ax.set_title(f"RSS: peak {res['memory_gb']['peak_rss']} GB")
    ax.legend(fontsize=8)
    s = res["settings"]
    fig.suptitle(
        f"SmolLM2-135M fp32 training, {res['torch_threads']} thread(s), {s['max_tokens']}-token "
        f"packed micro-batches, gradient checkpointing {s['gradient_checkpointing']}, "
        f"compile {s['compile']}, {s['optimizer']} (load {res['loadavg_before_after']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is warm-up)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="packed micro-batch tokens")
    ap.add_argument("--examples", type=int, default=64, help="builtin:train examples")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train.compile = true")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="steps left out of the rates (the first allocates the AdamW state and, with "
        "--compile, compiles)",
    )
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused"])
    ap.add_argument(
        "--compile-memory-budget", type=float, default=None,
        help="train.compile_memory_budget (default: the config's)",
    )  # fmt: skip
    ap.add_argument(
        "--profile", action="store_true",
        help="profile the last step (top ops by self CPU time into the JSON; that step runs "
        "slower under the profiler, so take rates from a run without it)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = main(args)
    r.pop("rss_timeline")
    r.pop("steps")
    print(json.dumps(r, indent=2))
