"""benchmarks/bench_train.py runs end to end on the tiny model (a smoke test of the script's
plumbing: the trainer hooks, FLOP count, RSS sampling and the JSON + PNG it writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_writes_its_result(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--model",
           str(tiny_model_dir), "--steps", "2", "--examples", "8", "--out", str(out), "--profile"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(r["steps"]) == 2 and r["settings"]["optimizer"] == "adamw"
    assert r["dense_params"] > 0 and r["head_params"] > 0
    assert r["pct_of_ceiling_cpu"] > 0 and r["memory_gb"]["peak_rss"] > 0
    # Eager keeps more than the layer input per token and layer (hidden size 64 here).
    assert r["saved_activation_floats_per_token_layer"] > 64
    ops = r["profile_last_step"]
    assert r["settings"]["profiled_step"] == 2 and "aten::mm" in {o["op"] for o in ops}
    assert 0 < sum(o["share_of_step"] for o in ops) <= 1.05
