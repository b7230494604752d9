"""The paraphrase tier's filter in a build: an echo of the request never becomes a target."""

import pytest

from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import GENERATIONS, GenerationRow, RunDir
from ssrengine.data.records import load_examples
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge, paraphrase_judge
from ssrengine.rehearsal.stages import (
    generation_keys,
    judge_rows,
    open_generator,
    paraphrase_messages,
)
from tests import rows as stage_rows
from tests.tiny import records, write_jsonl


def test_build_takes_filtered_paraphrases_only(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(3))  # ex-000 unanswerable
    examples = load_examples(data)
    cfg = load_config(None, [f"--data.train_file={data}", "--judge.paraphrase=true"])
    rd = RunDir(tmp_path)
    own = {e.id: "Founded in 1066." for e in examples}  # every own answer is wrong
    judge_rows(cfg, tmp_path, examples, own, RuleJudge())
    write_jsonl(tmp_path / GENERATIONS, stage_rows.generations(cfg, examples, own))
    para = {
        "ex-000": 'A correct answer is: "The documents do not say."',  # the echo
        "ex-001": "Acme was founded in 1901.",
        "ex-002": "Acme was founded in 1902 by Martians.",  # ungrounded
    }
    gen = open_generator(cfg)
    keys = generation_keys(cfg, examples, gen, lambda e: paraphrase_messages(cfg, e))
    write_jsonl(
        rd.paraphrases,
        [
            GenerationRow(
                e.id, para[e.id], [], "stop", gen.backend, gen.model, keys[e.id].rsplit("|", 1)[1]
            ).to_json()
            for e in examples
        ],
    )
    # verdicts of the bare judge are not the tier's: build asks for the judge stage
    judge_rows(cfg, tmp_path, examples, para, RuleJudge(), path=rd.paraphrase_verdicts)
    with pytest.raises(InputError, match="run the judge stage again"):
        run_build(cfg, tmp_path, examples)
    judge_rows(
        cfg, tmp_path, examples, para, paraphrase_judge(cfg, RuleJudge()),
        path=rd.paraphrase_verdicts,
    )  # fmt: skip
    run_build(cfg, tmp_path, examples)
    built = {r["id"]: r for r in read_rows(rd.rehearsal)}
    assert {i: r["source"] for i, r in built.items()} == {
        "ex-000": "gold",
        "ex-001": "paraphrase",
        "ex-002": "gold",
    }
    assert built["ex-001"]["target"] == para["ex-001"]
    # without the filter the echo and the made-up detail would have been targets
    off = load_config(
        None,
        [f"--data.train_file={data}", "--judge.paraphrase=true", "--judge.paraphrase_filter=false"],
    )
    judge_rows(off, tmp_path, examples, para, RuleJudge(), path=rd.paraphrase_verdicts)
    run_build(off, tmp_path, examples)
    assert {r["source"] for r in read_rows(rd.rehearsal)} == {"paraphrase"}
