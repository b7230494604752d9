import json
from dataclasses import replace

import pytest

from ssrengine.cli import main as cli_main
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.eval_rows import EvalDetail
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import (
    BuildStats,
    GenerationRow,
    MetricRow,
    RehearsalRow,
    RunDir,
    VerdictRow,
)
from ssrengine.data.records import load_examples
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge
from ssrengine.rehearsal.stages import judge_rows
from tests import rows as rows_for
from tests.tiny import records, write_jsonl

REFUSAL = "The documents do not say."


def _gen(i, response="Founded in 1987."):
    return GenerationRow(i, response, [1, 2], "stop", "hf", "m", "h")


@pytest.mark.parametrize(
    "row",
    [
        _gen("a"),
        VerdictRow("a", True, 0.5, "why", "rule(f1>=0.3)", "h"),
        RehearsalRow("a", [{"role": "user", "content": "q"}], [], "t", "self", None),
        MetricRow(step=3, loss=0.5, lr=1e-4, tokens=10),
        EvalDetail("a", False, False, 0.5, 0.25),
        EvalDetail("b", True, True),
    ],
)
def test_rows_round_trip_through_json(row):
    text = json.dumps(row.to_json())
    assert type(row).from_json(json.loads(text), "f.jsonl", 1) == row


def test_optional_eval_fields_are_left_out_as_before():
    assert EvalDetail("b", True, True).to_json() == {
        "id": "b",
        "unanswerable": True,
        "declined": True,
    }


def test_build_stats_json_keeps_its_keys():
    rows = [RehearsalRow("a", [], [], "t", s, True) for s in ("self", "gold", "gold", "self")]
    assert BuildStats.of(rows).to_json()["answerable"] == {
        "n": 4, "self": 2, "paraphrase": 0, "gold": 2, "R_share": 0.5,
    }  # fmt: skip
    assert BuildStats.from_json(BuildStats.of(rows).to_json(), "b.json") == BuildStats.of(rows)


@pytest.fixture
def ssr_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    run = tmp_path / "run"
    args = [f"--data.train_file={data}", f"--run.dir={run}", "--run.mode=ssr"]
    examples = load_examples(data)
    cfg = load_config(None, args)
    run.mkdir()
    answer = {e.id: "Founded in 1987." for e in examples}
    write_jsonl(RunDir(run).generations, rows_for.generations(cfg, examples, answer))
    write_jsonl(RunDir(run).verdicts, [rows_for.verdict(cfg, e, answer[e.id]) for e in examples])
    return run, args, examples


# Stage files with valid JSON of the wrong shape: (file, line 3 replaced by, message fragment)
WRONG_SHAPE = [
    (
        "generations",
        lambda r: [r],
        "generations.jsonl:3: corrupt row in a stage output (not a JSON object)",
    ),
    (
        "generations",
        lambda r: "text",
        "generations.jsonl:3: corrupt row in a stage output (not a JSON object)",
    ),
    (
        "generations",
        lambda r: {k: v for k, v in r.items() if k != "model"},
        "generations.jsonl:3: field 'model': missing",
    ),
    (
        "generations",
        lambda r: {**r, "response": None},
        "generations.jsonl:3: field 'response': expected str",
    ),
    (
        "generations",
        lambda r: {**r, "token_ids": ["a"]},
        "generations.jsonl:3: field 'token_ids': expected list[int]",
    ),
    (
        "verdicts",
        lambda r: {k: v for k, v in r.items() if k != "accept"},
        "verdicts.jsonl:3: field 'accept': missing",
    ),
    (
        "verdicts",
        lambda r: {**r, "accept": "yes"},
        "verdicts.jsonl:3: field 'accept': expected bool",
    ),
    ("verdicts", lambda r: {**r, "score": True}, "verdicts.jsonl:3: field 'score': expected float"),
]


@pytest.mark.parametrize(("stage_file", "corrupt", "fragment"), WRONG_SHAPE)
def test_wrong_shape_rows_are_one_line_exit_2(ssr_run, capsys, stage_file, corrupt, fragment):
    run, args, _ = ssr_run
    path = getattr(RunDir(run), stage_file)
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(corrupt(json.loads(lines[2])))
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    assert cli_main(["build", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert path.read_bytes() == before  # nothing produced is lost
    assert not RunDir(run).rehearsal.exists()


def test_the_same_rows_build(ssr_run, capsys):
    run, args, examples = ssr_run
    assert cli_main(["build", *args]) == 0
    rows = list(read_typed(RunDir(run).rehearsal, RehearsalRow))
    assert [r.id for r in rows] == [e.id for e in examples]


def test_edited_gold_answer_is_judged_again_and_build_follows(tmp_path):
    """The verdict depends on the gold answer and the label: editing them must not reuse it."""
    cfg = load_config(None, ["--run.mode=ssr", "--judge.batch_size=2"])
    examples = load_examples(write_jsonl(tmp_path / "train.jsonl", records(4)))
    answerable = [e for e in examples if e.answerable]
    cands = {e.id: e.response for e in answerable}
    write_jsonl(RunDir(tmp_path).generations, rows_for.generations(cfg, answerable, cands))
    first = judge_rows(cfg, tmp_path, answerable, cands, RuleJudge())
    assert all(v.accept for v in first.values())
    assert run_build(cfg, tmp_path, answerable).overall.own == len(answerable)

    edited = [replace(answerable[0], response=REFUSAL, answerable=False), *answerable[1:]]
    # build alone refuses a verdict made for other inputs ...
    with pytest.raises(InputError, match="run the judge stage again"):
        run_build(cfg, tmp_path, edited)
    # ... and the judge recomputes exactly that one verdict
    again = judge_rows(cfg, tmp_path, edited, cands, RuleJudge())
    assert not again[edited[0].id].accept
    assert all(again[e.id].accept for e in edited[1:])
    assert len(list(read_typed(RunDir(tmp_path).verdicts, VerdictRow))) == len(answerable) + 1
    stats = run_build(cfg, tmp_path, edited)
    assert (stats.overall.own, stats.overall.gold) == (len(answerable) - 1, 1)
    rows = {r.id: r for r in read_typed(RunDir(tmp_path).rehearsal, RehearsalRow)}
    assert rows[edited[0].id].source == "gold" and rows[edited[0].id].target == REFUSAL
