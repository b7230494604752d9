import json
import re

from ssrengine.evaluation import probe_gen
from ssrengine.evaluation.retention import (
    MC_FILE,
    PROBE_FILE,
    asset_path,
    load_mc,
    load_probe,
    probe_correct,
)


def _shipped(name, prefix):
    rows = [json.loads(x) for x in asset_path(name).read_text().splitlines()]
    return [r for r in rows if r["id"].startswith(prefix)]


def test_shipped_generated_items_are_the_generators_output():
    assert _shipped(PROBE_FILE, "probe-gen-") == probe_gen.probe_rows()
    assert _shipped(MC_FILE, "mc-gen-") == probe_gen.mc_rows()
    assert len(load_probe()) == 64 + probe_gen.N_PROBE
    assert len(load_mc()) == 60 + probe_gen.N_MC


def _solve(q):
    """The answer of a generated question, recomputed from its text alone."""
    if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"plus": a + b, "minus": a - b, "times": a * b}[op])
    if m := re.fullmatch(r"Which (day of the week|month) comes after (\w+)\?", q):
        seq = probe_gen.DAYS if m[1].startswith("day") else probe_gen.MONTHS
        return seq[(seq.index(m[2]) + 1) % len(seq)]
    if m := re.fullmatch(r"Which letter of the alphabet comes right after ([A-Z])\?", q):
        return chr(ord(m[1]) + 1)
    if m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", q):
        return str(len(m[1]))
    if m := re.fullmatch(r"What is the first letter of the word '(\w+)'\?", q):
        return m[1][0].upper()
    raise AssertionError(f"unknown template: {q}")


def test_generated_items_are_correct_and_cannot_be_scored_by_echoing():
    for p in load_probe():
        if p.id.startswith("probe-gen-"):
            assert p.reference == _solve(p.prompt)
            assert probe_correct(f"The answer is {p.reference}.", p.accept)
            assert not probe_correct(p.prompt, p.accept), p.prompt
    for m in load_mc():
        if m.id.startswith("mc-gen-"):
            assert m.choices[m.answer] == _solve(m.question)
            assert len(set(m.choices)) == 4


def test_rewrite_keeps_hand_written_rows(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "probe-001", "x": 1}\n{"id": "probe-gen-001", "x": 2}\n')
    probe_gen.rewrite(f, "probe-gen-", [{"id": "probe-gen-001", "x": 3}])
    assert [json.loads(x)["x"] for x in f.read_text().splitlines()] == [1, 3]
