"""Benchmark: padding-free packing vs padded micro-batches, and the native vs Python packer.

    python benchmarks/bench_packing.py                         # everything (CPU, ~15-30 min)
    python benchmarks/bench_packing.py --skip-smollm2          # packer + utilization + tiny

1. Token utilization, real tokens / tokens processed, on two length distributions:
   `demo` (builtin:train, SmolLM2 chat template: prompt with documents + answer) and
   `longtail` (log-normal, median 128, sigma 0.9, clipped to [16, 1024]). Padded micro-batches
   of --batch sequences in a seeded shuffle (`padded`, what the trainer does) or length-sorted
   (`padded-sorted`); packed bins of --max-tokens. Packed rows carry no padding, so every
   processed token is real; their bin fill (real / (bins x max_tokens)) is reported too: it is
   the utilization if the rows were padded to a static shape.
2. Training tokens/s (real tokens per second of forward + backward with the trainer's loss,
   `ssrengine.training.loss.loss_sum`; the optimizer step is per-step work the batching does not
   change and is left out), on the tiny Llama of the tests and on SmolLM2-135M, CPU fp32:
   `packed` (varlen attention on the precomputed cu_seqlens: `sdpa_varlen`, one SDPA call per
   example), `packed-mask` (the same rows with position_ids only: transformers' sdpa over the
   whole row with a (T, T) block-diagonal mask), `padded-sorted` and `padded` (sdpa with the
   padding mask). The micro-batches come from `ssrengine.training.batching` (the trainer's code;
   length-sorted padded batches are built with its `padded_batch`) over the same sample of
   examples, interleaved (always the batching least far through its tokens next) so that load
   from other jobs on this shared machine hits all of them alike. Torch runs one intra-op
   thread and each step's process CPU time is recorded besides its wall time: tokens per
   CPU-second is what one unloaded core would do and is robust to the load (recorded too);
   the speedups quoted are from CPU time, wall-clock ones are in the JSON.
3. Packer time for 1M and 10M lengths (longtail, capped at --max-tokens): the C++ planner vs
   the Python fallback (identical bins; Python timed on 1M only and extrapolated linearly).

Writes results/packing.json and results/packing.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssrengine import IGNORE_INDEX
from ssrengine.core.config import DataConfig, TrainConfig
from ssrengine.models import attention as A
from ssrengine.models import packing as P
from ssrengine.training.batching import Encoded, MicroBatch, micro_batches, padded_batch

RESULTS = Path(__file__).parent / "results"
# batching -> the attention implementation it runs with
MODES = {
    "packed": A.SDPA_VARLEN,
    "packed-mask": "sdpa",
    "padded-sorted": "sdpa",
    "padded": "sdpa",
}
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", A.HOST_BOUNDS)


# ------------------------------------------------------------------------------ data


def demo_lengths() -> tuple[np.ndarray, np.ndarray]:
    """(lengths, target lengths) of builtin:train encoded for SmolLM2, as the trainer does."""
    from ssrengine.data.builtin import resolve_data_file
    from ssrengine.data.records import encode, load_examples, prompt_messages
    from ssrengine.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    system = DataConfig().system_prompt
    lens, tgts = [], []
    for e in load_examples(resolve_data_file("builtin:train")):
        ids, labels = encode(tok, prompt_messages(e.messages, e.documents, system), e.response)
        lens.append(len(ids))
        tgts.append(sum(y != IGNORE_INDEX for y in labels))
    return np.array(lens), np.array(tgts)


def longtail_lengths(n: int, seed: int = 0, cap: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(128), 0.9, n), 16, cap).astype(np.int64)
    tgts = np.maximum(1, (lens * rng.uniform(0.05, 0.5, n)).astype(np.int64))
    return lens, tgts


def synth_encoded(lens: np.ndarray, tgts: np.ndarray, vocab: int, seed: int = 0) -> list[Encoded]:
    """Examples with these lengths and target counts; random token ids (content is irrelevant
    to speed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (n, t) in enumerate(zip(lens.tolist(), tgts.tolist())):
        ids = rng.integers(3, vocab, n).tolist()
        out.append(Encoded(f"x{i}", ids, [IGNORE_INDEX] * (n - t) + ids[n - t :]))
    return out


def without_boundaries(mb: MicroBatch) -> MicroBatch:
    kw = {k: v for k, v in mb.model_kwargs.items() if k not in VARLEN_KEYS}
    return dataclasses.replace(mb, model_kwargs=kw)


def batchings(encoded: list[Encoded], batch: int, max_tokens: int) -> dict[str, list[MicroBatch]]:
    """The batchings of one epoch, each from the trainer's batching code. `packed` carries the
    varlen boundaries (used by sdpa_varlen / flash-attn); `packed-mask` only position_ids, from
    which transformers' sdpa builds a (T, T) block-diagonal mask."""
    packed = micro_batches(
        encoded, TrainConfig(packing=True, max_tokens=max_tokens), epoch=0, pad_id=0
    )
    padded = micro_batches(encoded, TrainConfig(micro_batch_size=batch), epoch=0, pad_id=0)
    by_len = sorted(encoded, key=lambda e: len(e.input_ids))
    sorted_ = [padded_batch(by_len[i : i + batch], 0) for i in range(0, len(by_len), batch)]
    random.Random(0).shuffle(sorted_)  # a length-grouped sampler still shuffles its batches
    return {
        "packed": packed,
        "packed-mask": [without_boundaries(mb) for mb in packed],
        "padded-sorted": sorted_,
        "padded": padded,
    }


def processed(mb: MicroBatch) -> int:
    return mb.input_ids.numel()


# ------------------------------------------------------------------------------ 1. utilization


def utilization(lens: np.ndarray, tgts: np.ndarray, batch: int, max_tokens: int) -> dict:
    enc = synth_encoded(lens, tgts, vocab=100)
    out: dict[str, Any] = {"examples": len(lens), "mean_len": float(lens.mean())}
    for mode, mbs in batchings(enc, batch, max_tokens).items():
        real = sum(mb.real_tokens for mb in mbs)
        out[mode] = {"micro_batches": len(mbs), "utilization": real / sum(map(processed, mbs))}
    bins = out["packed"]["micro_batches"]
    out["packed"]["bin_fill"] = float(lens.sum()) / (bins * max_tokens)
    out["packed"]["min_bins"] = int(-(-lens.sum() // max_tokens))
    return out


# ------------------------------------------------------------------------------ 2. tokens/s


def tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(  # the tests' tiny Llama (tests/tiny.py)
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model


def smollm2() -> Any:
    from ssrengine.models.loading import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu", attn_implementation="sdpa")


def throughput(model: Any, encoded: list[Encoded], batch: int, max_tokens: int) -> dict:
    from ssrengine.training.loss import loss_sum

    model.train()
    runs = batchings(encoded, batch, max_tokens)
    stats = {
        m: {"seconds": 0.0, "cpu_seconds": 0.0, "real": 0, "processed": 0, "micro_batches": 0}
        for m in runs
    }

    A.register_sdpa_varlen()

    def step(mb: MicroBatch, mode: str) -> None:
        if model.config._attn_implementation != MODES[mode]:
            model.set_attn_implementation(MODES[mode])
        loss_sum(model, mb).backward()
        model.zero_grad(set_to_none=True)

    for mode, mbs in runs.items():  # warm-up: first call of each shape family
        step(mbs[0], mode)
    # Interleave by progress: always run the batching with the smallest done fraction of its
    # tokens, so each one is spread over the whole run and load changes hit all alike.
    total = {m: sum(mb.real_tokens for mb in mbs) for m, mbs in runs.items()}
    load = [os.getloadavg()[0]]
    while any(s["micro_batches"] < len(runs[m]) for m, s in stats.items()):
        mode = min(
            (m for m, s in stats.items() if s["micro_batches"] < len(runs[m])),
            key=lambda m: stats[m]["real"] / total[m],
        )
        s = stats[mode]
        mb = runs[mode][s["micro_batches"]]
        wall, cpu = time.perf_counter(), time.process_time()
        step(mb, mode)
        s["seconds"] += time.perf_counter() - wall
        s["cpu_seconds"] += time.process_time() - cpu
        s["real"] += mb.real_tokens
        s["processed"] += processed(mb)
        s["micro_batches"] += 1
        load.append(os.getloadavg()[0])
    for s in stats.values():
        s["tokens_per_s"] = s["real"] / s["seconds"]
        s["tokens_per_cpu_s"] = s["real"] / s["cpu_seconds"]
        s["utilization"] = s["real"] / s["processed"]
    for s in stats.values():
        s["speedup_vs_padded"] = s["tokens_per_s"] / stats["padded"]["tokens_per_s"]
        s["cpu_speedup_vs_padded"] = s["tokens_per_cpu_s"] / stats["padded"]["tokens_per_cpu_s"]
    return {"examples": len(encoded), "loadavg": [round(x, 2) for x in load], **stats}


# ------------------------------------------------------------------------------ 3. packer


def packer_times(max_tokens: int, sizes: tuple[int, ...], python_max: int) -> dict:
    out: dict[str, Any] = {"max_tokens": max_tokens, "distribution": "longtail"}
    for n in sizes:
        lens, _ = longtail_lengths(n, seed=1, cap=max_tokens)
        row: dict[str, Any] = {}
        if P.native_available():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                native = P.plan_bins(lens, max_tokens, impl="native")
                times.append(time.perf_counter() - t0)
            row["native_s"] = min(times)
            row["bins"] = len(native[1]) - 1
        if n <= python_max:
            t0 = time.perf_counter()
            python = P.plan_bins(lens, max_tokens, impl="python")
            row["python_s"] = time.perf_counter() - t0
            if P.native_available():
                row["identical_bins"] = all(np.array_equal(a, b) for a, b in zip(native, python))
        out[str(n)] = row
    small = max(n for n in sizes if n <= python_max)
    for n in sizes:
        row = out[str(n)]
        if "python_s" not in row:
            row["python_s_extrapolated"] = out[str(small)]["python_s"] * n / small
        py = row.get("python_s", row.get("python_s_extrapolated"))
        if "native_s" in row:
            row["speedup"] = py / row["native_s"]
    return out


# ------------------------------------------------------------------------------ plot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {
        "packed": "tab:green",
        "packed-mask": "tab:olive",
        "padded-sorted": "tab:blue",
        "padded": "tab:red",
    }
    dists = list(res["utilization"])
    w = 0.27
    ax = axes[0]
    for j, mode in enumerate(("packed", "padded-sorted", "padded")):
        vals = [100 * res["utilization"][d][mode]["utilization"] for d in dists]
        bars = ax.bar(np.arange(len(dists)) + (j - 1) * w, vals, w, label=mode, color=colors[mode])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    fills = [100 * res["utilization"][d]["packed"]["bin_fill"] for d in dists]
    ax.scatter(np.arange(len(dists)) - w, fills, marker="_", s=300, c="k", label="packed bin fill")
    ax.set_xticks(np.arange(len(dists)), dists)
    ax.set_ylabel("real tokens / processed tokens (%)")
    ax.set_ylim(0, 110)
    ax.set_title(f"Token utilization (batch {res['batch']}, bins {res['max_tokens']})")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    runs = list(res["throughput"])
    for j, mode in enumerate(MODES):
        vals = [res["throughput"][r][mode]["cpu_speedup_vs_padded"] for r in runs]
        x = np.arange(len(runs)) + (j - 1.5) * 0.2
        bars = ax.bar(x, vals, 0.2, label=mode, color=colors[mode])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.8, ls="--", c="gray", lw=1)
    ax.set_xticks(np.arange(len(runs)), [r.replace("/", "\n") for r in runs], fontsize=8)
    ax.set_ylabel("training tokens/s relative to unsorted padded")
    ax.set_title("Training tokens per CPU-second, fp32 fwd + bwd")
    ax.legend(fontsize=8)

    ax = axes[2]
    sizes = [k for k in res["packer"] if k.isdigit()]
    py = [
        res["packer"][k].get("python_s", res["packer"][k].get("python_s_extrapolated"))
        for k in sizes
    ]
    nat = [res["packer"][k].get("native_s", np.nan) for k in sizes]
    x = np.arange(len(sizes))
    b1 = ax.bar(x - 0.2, py, 0.4, label="Python (10M: extrapolated)", color="tab:orange")
    b2 = ax.bar(x + 0.2, nat, 0.4, label="C++", color="tab:purple")
    ax.bar_label(b1, fmt="%.2f s", fontsize=8)
    ax.bar_label(b2, fmt="%.3f s", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{int(k) // 1_000_000}M lengths" for k in sizes])
    ax.set_ylabel("seconds")
    ax.set_title(f"Packer time (best-fit decreasing, bins of {res['packer']['max_tokens']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------ main


def main(
    *,
    batch: int = 4,
    max_tokens: int = 2048,
    tiny_examples: int = 200,
    smollm2_examples: int = 32,
    skip_smollm2: bool = False,
    threads: int = 1,
    out: Path = RESULTS,
) -> dict:
    torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads},
        "torch": torch.__version__,
        "batch": batch,
        "max_tokens": max_tokens,
        "native_packer": P.native_available(),
    }
    dists = {"demo": demo_lengths(), "longtail": longtail_lengths(400)}
    res["utilization"] = {d: utilization(*v, batch, max_tokens) for d, v in dists.items()}
    print(json.dumps(res["utilization"], indent=1), flush=True)
    res["packer"] = packer_times(max_tokens, (1_000_000, 10_000_000), python_max=1_000_000)
    print(json.dumps(res["packer"], indent=1), flush=True)

    res["throughput"] = {}
    models = [("tiny", tiny_model, tiny_examples)]
    if not skip_smollm2:
        models.append(("smollm2-135m", smollm2, smollm2_examples))
    for name, load, n in models:
        model = load()
        vocab = model.config.vocab_size
        for d, (lens, tgts) in dists.items():
            pick = np.random.default_rng(0).permutation(len(lens))[:n]
            enc = synth_encoded(lens[pick], tgts[pick], vocab)
            key = f"{name}/{d}"
            res["throughput"][key] = throughput(model, enc, batch, max_tokens)
            print(key, json.dumps(res["throughput"][key]), flush=True)
        del model

    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / "packing.png")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="padded micro-batch size")
    ap.add_argument("--max-tokens", type=int, default=2048, help="packed bin size")
    ap.add_argument("--tiny-examples", type=int, default=200)
    ap.add_argument("--smollm2-examples", type=int, default=32)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    main(
        batch=a.batch,
        max_tokens=a.max_tokens,
        tiny_examples=a.tiny_examples,
        smollm2_examples=a.smollm2_examples,
        skip_smollm2=a.skip_smollm2,
        threads=a.threads,
        out=a.out,
    )
