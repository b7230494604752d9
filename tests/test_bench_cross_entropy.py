"""benchmarks/bench_cross_entropy.py: every CPU contender computes naive's loss and gradients
before it is timed, and a run writes its JSON and PNG."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_cross_entropy", ROOT / "benchmarks" / "bench_cross_entropy.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_agreement_measures_a_wrong_contender():
    assert max(bench.agreement(bench.naive, 32, 500, 0.6, torch.float32, "cpu").values()) == 0
    off = bench.agreement(lambda h, w, y: 1.01 * bench.naive(h, w, y), 32, 500, 0.6,
                          torch.float32, "cpu")  # fmt: skip
    assert off["loss"] == pytest.approx(0.01, rel=1e-3) and off["grad_w"] > 1e-3
    assert max(off.values()) > bench.AGREEMENT_TOL["float32"]


def test_cpu_run_checks_every_contender_and_writes_json_and_png(tmp_path):
    out = tmp_path / "ce.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_cross_entropy.py"), "--shapes",
           "smollm2", "--n", "64", "--repeats", "1", "--warmup", "0", "--no-memory",
           "--threads", "1", "--out", str(out)]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    impls = {r["impl"]: r for r in result["results"]}
    want = {"naive", "ssr-torch", "ssr-torch-filter"}
    if importlib.util.find_spec("liger_kernel") is not None:
        want.add("liger-torch")  # Liger's own driver, with its chunk kernel in torch
    assert set(impls) == want
    for r in impls.values():
        assert max(r["agreement"].values()) <= bench.AGREEMENT_TOL["float32"]
        assert r["fwd_bwd_ms"] > 0 and r["N"] == 64
    assert {s["impl"] for s in result["summary"]} == want - {"naive"}
    assert out.with_suffix(".png").stat().st_size > 10_000
