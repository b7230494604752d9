import json
from collections import Counter
from dataclasses import replace

import pytest

from ssrengine.core.config_load import load_config
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import GENERATIONS, VERDICTS, BuildStats, RehearsalRow
from ssrengine.data.records import load_examples
from ssrengine.generation.hf import HFGenerator
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge
from ssrengine.rehearsal.stages import generate_rows, judge_rows
from tests import rows as rows_for
from tests.tiny import records, write_jsonl


class Interrupting:
    """Wraps a generator and dies (like a kill) on call number ``fail_at``."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.backend, self.model = inner.backend, inner.model

    def generate(self, requests, sampling):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.generate(requests, sampling)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    data = write_jsonl(tmp / "train.jsonl", records(10))
    cfg = load_config(
        None,
        [
            f"--model.path={tiny_model_dir}",
            f"--data.train_file={data}",
            "--generation.batch_size=3",
            "--generation.concurrency=1",
            "--generation.max_new_tokens=6",
            "--judge.batch_size=4",
        ],
    )
    return cfg, load_examples(data), HFGenerator(cfg.model, cfg.generation)


def test_generate_killed_midway_resumes_without_loss_or_duplicates(setup, tmp_path):
    cfg, examples, gen = setup
    ref = generate_rows(cfg, tmp_path / "ref", examples, gen)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        generate_rows(cfg, run, examples, Interrupting(gen, fail_at=3))
    assert len(read_rows(run / GENERATIONS)) == 6  # two chunks of 3 finished before the kill
    with open(run / GENERATIONS, "a") as f:
        f.write('{"id": "ex-009", "respon')  # a row torn by the kill
    rows = generate_rows(cfg, run, examples, gen)
    on_disk = read_rows(run / GENERATIONS)
    assert Counter(r["id"] for r in on_disk) == Counter(e.id for e in examples)
    assert {i: r.response for i, r in rows.items()} == {i: r.response for i, r in ref.items()}
    # A finished stage is a no-op.
    calls = Interrupting(gen, fail_at=1)
    generate_rows(cfg, run, examples, calls)
    assert calls.calls == 0


def test_changed_prompt_is_regenerated_not_reused(setup, tmp_path):
    cfg, examples, gen = setup
    generate_rows(cfg, tmp_path, examples, gen)
    cfg2 = load_config(
        None,
        [
            f"--model.path={cfg.model.path}",
            "--data.system_prompt=Other.",
            "--generation.max_new_tokens=6",
            "--generation.batch_size=3",
        ],
    )
    rows = generate_rows(cfg2, tmp_path, examples, gen)
    assert len(rows) == len(examples)
    assert len(read_rows(tmp_path / GENERATIONS)) == 2 * len(examples)


def test_judge_resumes_and_build_counts(setup, tmp_path):
    cfg, examples, _ = setup
    cands = {
        e.id: (e.response if i % 2 else "Something else entirely.") for i, e in enumerate(examples)
    }
    judge = RuleJudge(cfg.judge.min_f1)  # the configured judge: build reads its verdicts

    class Dying(RuleJudge):
        def judge_batch(self, exs, cs):
            if examples[8] in exs:
                raise KeyboardInterrupt
            return super().judge_batch(exs, cs)

    dying = Dying(cfg.judge.min_f1)
    with pytest.raises(KeyboardInterrupt):
        judge_rows(cfg, tmp_path, examples, cands, dying)
    assert len(read_rows(tmp_path / VERDICTS)) == 8  # two chunks of 4 saved before the kill
    verdicts = judge_rows(cfg, tmp_path, examples, cands, judge)
    assert Counter(r["id"] for r in read_rows(tmp_path / VERDICTS)) == Counter(
        e.id for e in examples
    )
    assert [verdicts[e.id].accept for e in examples] == [bool(i % 2) for i in range(len(examples))]
    write_jsonl(tmp_path / GENERATIONS, rows_for.generations(cfg, examples, cands))
    stats = run_build(cfg, tmp_path, examples).to_json()
    rows = read_rows(tmp_path / "rehearsal.jsonl")
    assert [r["source"] for r in rows] == [
        "self" if i % 2 else "gold" for i in range(len(examples))
    ]
    assert all(r["target"] == cands[r["id"]] for r in rows if r["source"] == "self")
    assert stats["overall"] == {"n": 10, "self": 5, "paraphrase": 0, "gold": 5, "R_share": 0.5}
    assert stats == json.loads((tmp_path / "build_stats.json").read_text())


def _rehearsal(source, answerable):
    return RehearsalRow("x", [], [], "t", source, answerable)


def test_build_stats_split_by_answerability():
    rows = [
        _rehearsal(source="self", answerable=True),
        _rehearsal(source="gold", answerable=True),
        _rehearsal(source="self", answerable=False),
    ]
    s = BuildStats.of(rows).to_json()
    assert s["answerable"]["R_share"] == 0.5 and s["unanswerable"]["R_share"] == 1.0


def test_changed_dtype_or_backend_is_regenerated_not_reused(setup, tmp_path):
    """The generation key covers what the answer depends on besides prompt and model."""
    cfg, examples, gen = setup
    generate_rows(cfg, tmp_path, examples, gen)
    bf16 = replace(cfg, model=replace(cfg.model, dtype="bfloat16"))
    generate_rows(bf16, tmp_path, examples, gen)
    assert len(read_rows(tmp_path / GENERATIONS)) == 2 * len(examples)
    other = Interrupting(gen, fail_at=0)
    other.backend = "sglang-http"
    rows = generate_rows(bf16, tmp_path, examples, other)
    assert len(read_rows(tmp_path / GENERATIONS)) == 3 * len(examples)
    assert {r.backend for r in rows.values()} == {"sglang-http"}
