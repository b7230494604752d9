"""generation.num_samples: k seeded answers per prompt, each under its own key; the first
accepted in sample order becomes the target."""

from dataclasses import replace

import pytest

from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.core.provenance import read_provenance, stage_config
from ssrengine.core.rundir import GENERATIONS, VERDICTS, GenerationRow, RunDir
from ssrengine.data.records import load_examples
from ssrengine.generation.hf import HFGenerator
from ssrengine.pipeline import rows_hash, run_stage
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge
from ssrengine.rehearsal.stages import (
    current_samples,
    generate_rows,
    open_generator,
    prompt_hashes,
    run_judge,
)
from tests.tiny import records, write_jsonl


def test_num_samples_needs_a_temperature():
    with pytest.raises(
        InputError, match=r"generation\.num_samples=3 needs generation\.temperature"
    ):
        load_config(None, ["--generation.num_samples=3"])
    with pytest.raises(InputError, match=r"generation\.num_samples"):
        load_config(None, ["--generation.num_samples=0", "--generation.temperature=1"])
    cfg = load_config(None, ["--generation.num_samples=3", "--generation.temperature=0.7"])
    assert cfg.generation.num_samples == 3
    # part of the generate stage's record: a changed k is a changed generation
    assert stage_config(cfg.to_dict(), "generate")["generation.num_samples"] == 3


def test_hf_samples_differ_by_index_and_repeat_exactly(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    cfg = load_config(
        None,
        [
            f"--model.path={tiny_model_dir}",
            f"--data.train_file={data}",
            "--generation.max_new_tokens=8",
            "--generation.temperature=1.0",
            "--generation.num_samples=2",
        ],
    )
    examples = load_examples(data)
    gen = HFGenerator(cfg.model, cfg.generation)
    first = generate_rows(cfg, tmp_path / "a", examples, gen, sample=0)
    second = generate_rows(cfg, tmp_path / "a", examples, gen, sample=1)
    assert [first[e.id].token_ids for e in examples] != [second[e.id].token_ids for e in examples]
    rows = read_rows(tmp_path / "a" / GENERATIONS)
    assert len(rows) == 8 and len({GenerationRow.from_json(r, "").key() for r in rows}) == 8
    assert [r.get("sample") for r in rows] == [None] * 4 + [1] * 4  # sample 0 reads as before
    again = generate_rows(cfg, tmp_path / "b", examples, gen, sample=1)
    assert {i: r.token_ids for i, r in again.items()} == {i: r.token_ids for i, r in second.items()}
    # both samples are read back under the current keys, in sample order
    samples = current_samples(cfg, tmp_path / "a", examples)
    assert [s[examples[0].id].token_ids for s in samples] == [
        first[examples[0].id].token_ids,
        second[examples[0].id].token_ids,
    ]
    # the generate stage makes every sample, and its record covers them all
    run = replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "run")))
    run_stage(run, "generate", examples=examples)
    made = current_samples(run, tmp_path / "run", examples)
    assert [{i: r.token_ids for i, r in m.items()} for m in made] == [
        {i: r.token_ids for i, r in first.items()},
        {i: r.token_ids for i, r in second.items()},
    ]
    record = read_provenance(RunDir(tmp_path / "run"))["generate"]
    assert record.output == rows_hash([*made[0].values(), *made[1].values()])


def _sample_rows(cfg, examples, sample, responses):
    gen = open_generator(cfg)  # lazy: only its names
    hashes = prompt_hashes(cfg, examples, gen, sample=sample)
    return [
        GenerationRow(
            e.id, responses[e.id], [], "stop", gen.backend, gen.model, hashes[e.id], sample or None
        ).to_json()
        for e in examples
    ]


def test_first_accepted_sample_becomes_the_target(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    examples = load_examples(data)
    cfg = load_config(
        None,
        [
            f"--data.train_file={data}",
            "--generation.temperature=0.8",
            "--generation.num_samples=3",
        ],
    )
    right = {e.id: e.response for e in examples}
    # ex-000: none right; ex-001..002: sample 1 right; ex-003..005: sample 0 and 2 right
    s0 = {e.id: (right[e.id] if i >= 3 else "Founded in 1066.") for i, e in enumerate(examples)}
    s1 = {
        e.id: (right[e.id] if i in (1, 2) else "Founded in 1067.") for i, e in enumerate(examples)
    }
    s2 = {
        e.id: (right[e.id] + " Yes." if i >= 1 else "Founded in 1068.")
        for i, e in enumerate(examples)
    }
    rows = [r for s, resp in enumerate([s0, s1, s2]) for r in _sample_rows(cfg, examples, s, resp)]
    write_jsonl(tmp_path / GENERATIONS, rows)
    with pytest.raises(InputError, match="run the generate stage"):
        run_judge(
            load_config(None, [f"--data.train_file={data}", "--generation.temperature=0.8",
                               "--generation.num_samples=4"]),
            tmp_path,
            examples,
        )  # fmt: skip
    verdicts = run_judge(cfg, tmp_path, examples)
    assert [verdicts[e.id].accept for e in examples] == [False, True, True, True, True, True]
    # a later sample is judged only where no earlier one was accepted (6, then 3, then 1)
    judged = read_rows(tmp_path / VERDICTS)
    assert len(judged) == 6 + 3 + 1
    run_build(cfg, tmp_path, examples)
    built = {r["id"]: r for r in read_rows(tmp_path / "rehearsal.jsonl")}
    assert built["ex-000"]["source"] == "gold"
    for i, e in enumerate(examples[1:], 1):
        assert built[e.id]["source"] == "self"
        assert built[e.id]["target"] == (s1 if i in (1, 2) else s0)[e.id]
    # with one sample the same file gives sample 0's verdicts, as before
    one = load_config(None, [f"--data.train_file={data}", "--generation.temperature=0.8"])
    assert [v.accept for v in run_judge(one, tmp_path, examples).values()] == [
        False, False, False, True, True, True,
    ]  # fmt: skip
    assert RuleJudge().name in judged[0]["judge"]


def test_hf_sample_depends_on_seed_and_prompt_not_on_its_batch(tiny_model_dir):
    from ssrengine.core.config import GenerationConfig, ModelConfig
    from ssrengine.generation.base import Request, SamplingParams

    gen = HFGenerator(ModelConfig(path=str(tiny_model_dir)), GenerationConfig(batch_size=8))
    questions = ["When was Acme founded?", "Who is the CEO of Acme?", "Where is Acme?", "Why?"]
    reqs = [Request(messages=[{"role": "user", "content": q}]) for q in questions]

    def sample(rs, seed):
        hot = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed)
        return [o.token_ids for o in gen.generate(rs, hot)]

    together = sample(reqs, 5)
    # alone, or in another batch (a resumed stage's), each prompt draws the same answer
    assert [sample([r], 5)[0] for r in reqs] == together
    assert sample(reqs[::-1], 5) == together[::-1]
    assert sample(reqs, 6) != together  # the next sample index's seed draws others
