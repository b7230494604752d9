"""End to end on the real SmolLM2-135M-Instruct: the two-command pipeline over 20 examples."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.core.io import read_rows


@pytest.mark.slow
def test_ssr_pipeline_on_smollm2(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "ssrengine.train", "--config", "configs/demo.toml",
        f"--run.dir={run}", "--data.max_examples=20", "--generation.max_new_tokens=24",
        "--train.max_steps=2", "--train.micro_batch_size=4",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        f"run dir:     {run}" in res.stdout
        and "R/G split:" in res.stdout
        and "final loss:" in res.stdout
    )

    gens = read_rows(run / "generations.jsonl")
    verdicts = read_rows(run / "verdicts.jsonl")
    rehearsal = read_rows(run / "rehearsal.jsonl")
    assert len(gens) == len(verdicts) == len(rehearsal) == 20
    assert all(g["response"] and g["model"] == "smollm2-135m" for g in gens)
    accepted = {v["id"] for v in verdicts if v["accept"]}
    by_id = {g["id"]: g["response"] for g in gens}
    for r in rehearsal:
        assert r["source"] == ("self" if r["id"] in accepted else "gold")
        if r["source"] == "self":
            assert r["target"] == by_id[r["id"]]
    stats = json.loads((run / "build_stats.json").read_text())["overall"]
    assert stats["self"] == len(accepted) and f"R (self) {stats['self']}" in res.stdout

    metrics = read_rows(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    final = run / "checkpoints" / "step-2"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    # Rerunning a finished run does no work and prints the same summary.
    again = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert again.returncode == 0 and "training already finished" in again.stderr
    assert "Loading weights" not in again.stderr  # finished stages open no model
    assert len(read_rows(run / "generations.jsonl")) == 20
