import pytest

from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import GENERATIONS
from ssrengine.data.records import Example, load_examples
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge
from ssrengine.rehearsal.selection import answerable_gold
from ssrengine.rehearsal.stages import judge_rows
from tests import rows as stage_rows
from tests.tiny import records, write_jsonl

REFUSAL = "The documents do not say."


def _ex(i, answerable, doc):
    return Example(
        id=f"e{i}", messages=[{"role": "user", "content": "q?"}],
        documents=[{"title": "T", "text": doc}],
        response="In Oslo." if answerable else REFUSAL, answerable=answerable,
    )  # fmt: skip


def test_answerable_gold_prefers_same_documents_then_least_sure():
    exs = [
        _ex(0, False, "d1"), _ex(1, False, "d2"),  # unanswerable, gold
        _ex(2, True, "d9"), _ex(3, True, "d1"), _ex(4, True, "d7"), _ex(5, True, "d2"),
        _ex(6, True, "d8"),
    ]  # fmt: skip
    sources = {e.id: "gold" if not e.answerable else "self" for e in exs}
    scores = {"e2": 0.9, "e3": 0.95, "e4": 0.3, "e5": 0.99, "e6": 0.5}
    # share 0.5 with 2 unanswerable in G: 2 answerable needed, those over d1 and d2 first
    assert answerable_gold(exs, sources, scores, 0.5) == ["e3", "e5"]
    # share 0.6: ceil(0.6 * 2 / 0.4) = 3, then the least sure verdict
    assert answerable_gold(exs, sources, scores, 0.6) == ["e3", "e5", "e4"]
    # answerable gold already there counts: e6 is gold, so one more is needed
    assert answerable_gold(exs, {**sources, "e6": "gold"}, scores, 0.5) == ["e3"]
    assert answerable_gold(exs, sources, scores, 0.0) == []
    with pytest.raises(InputError, match="gold_answerable_share"):
        answerable_gold(exs, sources, scores, 1.0)


def test_build_keeps_answerable_hard_negatives_in_gold(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(12))  # 4 unanswerable, 8 answerable
    examples = load_examples(data)
    # a base model that never declines: own answers accepted on answerable examples only
    cands = {e.id: (e.response if e.answerable else "Founded in 1950.") for e in examples}
    base = ["--run.mode=ssr", f"--data.train_file={data}", "--judge.min_f1=0.5"]
    cfg = load_config(None, base)
    judge_rows(cfg, tmp_path, examples, cands, RuleJudge(0.5))
    write_jsonl(tmp_path / GENERATIONS, stage_rows.generations(cfg, examples, cands))
    plain = run_build(cfg, tmp_path, examples)
    assert plain.overall.gold == 4 and plain.answerable.gold == 0  # G is one class
    cfg = load_config(None, [*base, "--judge.gold_answerable_share=0.5"])
    stats = run_build(cfg, tmp_path, examples)
    assert stats.answerable.gold == 4 and stats.unanswerable.gold == 4
    rows = {r["id"]: r for r in read_rows(tmp_path / "rehearsal.jsonl")}
    gold_ans = [e for e in examples if e.answerable and rows[e.id]["source"] == "gold"]
    assert all(rows[e.id]["target"] == e.response for e in gold_ans)
    # seeded: the same choice again
    assert run_build(cfg, tmp_path, examples) == stats
    assert read_rows(tmp_path / "rehearsal.jsonl") == list(rows.values())
