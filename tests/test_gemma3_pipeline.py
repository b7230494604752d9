"""The whole pipeline on a tiny random Gemma-3 (sliding windows shorter than its prompts, mixed
layer types, Gemma's chat template and <end_of_turn> stop): run with SSR (generate, judge,
build, packed training under the default `auto` attention), eval, report and export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

from ssrengine.cli import main as cli_main
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import EVAL as EVAL_DIR
from ssrengine.models.loading import load_tokenizer
from tests.tiny import records, write_jsonl

FAST = ["--generation.max_new_tokens=6", "--generation.batch_size=4"]
EVAL = ["--limit", "4", "--probe-limit", "3", "--mc-limit", "3", "--lm-eval", "off"]


@pytest.fixture(scope="module")
def gemma_run(tiny_gemma3_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma3-run")
    train = write_jsonl(tmp / "train.jsonl", records(6))
    run = tmp / "run"
    argv = [
        "run", f"--model.path={tiny_gemma3_dir}", f"--data.train_file={train}",
        f"--run.dir={run}", "--run.mode=ssr", "--train.max_steps=2", "--train.packing=true",
        "--data.max_seq_len=256", "--train.max_tokens=512", *FAST,
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return tmp, run


def test_run_trains_packed_rows_longer_than_the_window(gemma_run, tiny_gemma3_dir):
    _, run = gemma_run
    tok = load_tokenizer(str(tiny_gemma3_dir))
    window = json.loads((tiny_gemma3_dir / "config.json").read_text())["sliding_window"]
    rehearsal = read_rows(run / "rehearsal.jsonl")
    assert len(rehearsal) == 6 and len(read_rows(run / "verdicts.jsonl")) == 6
    # every training example is longer than the window: the band is exercised in training
    from ssrengine.data.records import encode, prompt_messages

    cfg = json.loads((run / "config.json").read_text())
    for r in rehearsal:
        msgs = prompt_messages(r["messages"], r["documents"], cfg["data"]["system_prompt"])
        ids, labels = encode(tok, msgs, r["target"])
        assert len(ids) > window and ids[0] == tok.bos_token_id
        assert labels[-2] == tok.convert_tokens_to_ids("<end_of_turn>")  # then its "\n"
    metrics = read_rows(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0 for m in metrics)
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-2")
    assert type(model) is Gemma3ForCausalLM
    assert (
        model.config.layer_types
        == json.loads((tiny_gemma3_dir / "config.json").read_text())["layer_types"]
    )


def test_eval_report_and_export(gemma_run, tiny_gemma3_dir):
    tmp, run = gemma_run
    test = write_jsonl(tmp / "test.jsonl", records(6))
    base = tmp / "base"
    split = ["--split", f"in_domain={test}"]
    argv = ["eval", str(tiny_gemma3_dir), "--out", str(base), *split, *EVAL, *FAST]
    assert cli_main(argv) == 0
    assert cli_main(["eval", str(run), *split, *EVAL, *FAST, "--base-eval", str(base)]) == 0
    res = json.loads((run / EVAL_DIR / "eval.json").read_text())
    assert res["kind"] == "run" and res["splits"]["in_domain"]["n"] == 4
    own = res["retention"]["own_answers"]
    assert own["logprob_per_token"] < 0 and own["drift_per_token"] != 0.0  # trained: it moved
    report = tmp / "report"
    assert cli_main(["report", str(base), str(run), "--out", str(report)]) == 0
    assert (report / "report.md").is_file() and (report / "summary.json").is_file()
    assert cli_main(["export", str(run), "--out", str(tmp / "trl")]) == 0
    rows = [json.loads(x) for x in (tmp / "trl" / "rehearsal.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"][0]["role"] == "system"
