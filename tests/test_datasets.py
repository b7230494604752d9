"""The embedded content-grounded QA generator, the public-format loaders and their CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssrengine.core.errors import InputError
from ssrengine.core.io import iter_jsonl
from ssrengine.data import builtin, loaders
from ssrengine.data.__main__ import main
from ssrengine.data.builtin import GOLD_REFUSAL, SIZES, SPLITS, generate, resolve_data_file
from ssrengine.data.records import load_examples, parse_record

ASSETS = Path(__file__).parent / "assets"
MD2D_DIAL = ASSETS / "multidoc2dial" / "multidoc2dial_dial_train.json"
MD2D_DOC = ASSETS / "multidoc2dial" / "multidoc2dial_doc.json"
NQ = ASSETS / "nq" / "simplified-nq-dev-sample.jsonl"
MUSIQUE_ANS = ASSETS / "musique" / "musique_ans_v1.0_dev.jsonl"
MUSIQUE_FULL = ASSETS / "musique" / "musique_full_v1.0_dev.jsonl"
# sha256 of generate("validation", 0) as JSON lines. If this changes on purpose, bump
# builtin.GENERATOR_VERSION (it names the cache directory) and update the digest.
VALIDATION_SEED0_SHA256 = "01bf99741f3799adad07ee7a219f5aab9e3e5906e2b58343c01d3752776462d5"
STOPWORDS = {"a", "an", "the", "in", "into", "of"}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: generate(s) for s in SPLITS}


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def digest(records: list[dict]) -> str:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ builtin


def test_deterministic_per_seed_and_pinned():
    a, b, c = generate("validation", 0), generate("validation", 0), generate("validation", 1)
    assert a == b
    assert a != c
    assert digest(a) == VALIDATION_SEED0_SHA256, "generator output changed: bump the version"


def test_sizes_ids_and_record_format(splits):
    ids = set()
    for split, recs in splits.items():
        assert len(recs) == SIZES[split]
        for i, r in enumerate(recs):
            parse_record(r, file=split, line=i + 1)
            assert set(r) == {"id", "documents", "messages", "response", "answerable"}
            assert r["id"] == f"cgqa-{split}-{i:05d}"
        ids |= {r["id"] for r in recs}
    assert len(ids) == sum(SIZES.values())


def test_question_mix(splits):
    for recs in splits.values():
        unans = sum(not r["answerable"] for r in recs) / len(recs)
        assert 0.25 <= unans <= 0.35
        n_turns = [sum(m["role"] == "user" for m in r["messages"]) for r in recs]
        assert 0.3 <= sum(n > 1 for n in n_turns) / len(recs) <= 0.5
        assert {1, 2, 3} <= set(n_turns)
        lasts = [r["messages"][-1]["content"] for r in recs if len(r["messages"]) > 1]
        assert any(re.search(r"\b(it|its)\b", q) for q in lasts)  # pronoun follow-ups
        assert any(q.startswith(("What about", "And ", "How about")) for q in lasts)
        # both answer kinds after a follow-up, and on single turns
        for multi in (True, False):
            sub = [r for r in recs if (len(r["messages"]) > 1) == multi]
            assert {r["answerable"] for r in sub} == {True, False}


def test_documents_are_short(splits):
    for recs in splits.values():
        for r in recs:
            assert 1 <= len(r["documents"]) <= 3
            n = sum(len((d["title"] + " " + d["text"]).split()) for d in r["documents"])
            assert n <= 120
            for d in r["documents"]:
                assert 2 <= d["text"].count(". ") + 1 <= 4


def test_gold_style_refusal_and_grounding(splits):
    for recs in splits.values():
        for r in recs:
            doc_words = words(" ".join(d["text"] for d in r["documents"]))
            titles = [d["title"] for d in r["documents"]]
            said = " ".join(m["content"] for m in r["messages"] if m["role"] == "user")
            assert any(t in said for t in titles), r["id"]  # asks about a present entity
            golds = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
            if r["answerable"]:
                golds.append(r["response"])
            else:
                assert r["response"] == GOLD_REFUSAL
            for g in golds:
                assert g != GOLD_REFUSAL
                assert g.endswith(".") and len(g.split()) <= 8  # terse annotator style
                assert words(g) - STOPWORDS <= doc_words, (r["id"], g)


def test_splits_share_no_entities_and_ood_is_another_domain(splits):
    def entities(recs):
        return {d["title"] for r in recs for d in r["documents"]}

    ents = {s: entities(r) for s, r in splits.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not ents[a] & ents[b], (a, b)
    in_domain = " ".join(
        d["text"] for s in ("train", "test") for r in splits[s] for d in r["documents"]
    )
    ood = " ".join(d["text"] for r in splits["ood"] for d in r["documents"])
    assert {"company", "dollars", "founded"} <= words(in_domain)
    assert not {"company", "dollars", "founded"} & words(ood)
    assert {"town", "river"} <= words(ood)
    assert not {"town", "river"} & words(in_domain)


def test_materialize_once_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("SSRENGINE_CACHE", str(tmp_path))
    path = builtin.materialize("validation", seed=3)
    assert (
        path
        == tmp_path / "data" / f"builtin-v{builtin.GENERATOR_VERSION}-seed3" / "validation.jsonl"
    )
    mtime = path.stat().st_mtime_ns
    assert builtin.materialize("validation", seed=3) == path
    assert path.stat().st_mtime_ns == mtime
    exs = load_examples(resolve_data_file("builtin:validation", seed=3))
    assert [e.to_record() for e in exs] == generate("validation", 3)


# ------------------------------------------------------------------------------ loaders


def test_multidoc2dial():
    recs = loaders.load_multidoc2dial(MD2D_DIAL, MD2D_DOC)
    assert [r["id"] for r in recs] == [
        "md2d-d1f3a0-2",
        "md2d-d1f3a0-4",
        "md2d-d1f3a0-6",
        "md2d-d1f3a0-8",
        "md2d-e7b210-3",
        "md2d-e7b210-6",
    ]
    # no references -> unanswerable; respond_no_solution -> unanswerable even with references
    assert [r["answerable"] for r in recs] == [True, True, False, True, True, False]
    fish = recs[2]
    assert fish["response"].startswith("Sorry")  # the agent's own words, by default
    assert fish["messages"][-1] == {
        "role": "user",
        "content": "Can I also get a fishing permit there?",
    }
    assert [m["role"] for m in fish["messages"]] == ["user", "assistant"] * 2 + ["user"]
    assert fish["documents"][0]["title"] == "Renew your license online"  # nearest grounding
    car = recs[3]
    assert [d["title"] for d in car["documents"]] == ["Register a new vehicle"]
    assert "45 dollars" in car["documents"][0]["text"]  # the referenced section, whole
    ssa = recs[5]
    assert ssa["messages"][0]["content"] == "Hello. When can I start getting retirement benefits?"
    assert ssa["messages"][1]["content"] == "From age 62. Would you like to know how to apply?"

    full = loaders.load_multidoc2dial(MD2D_DIAL, MD2D_DOC, passage="document", refusal=GOLD_REFUSAL)
    assert "bring your current license" in full[0]["documents"][0]["text"]
    assert "bring your current license" not in recs[0]["documents"][0]["text"]
    assert [r["response"] == GOLD_REFUSAL for r in full] == [not r["answerable"] for r in full]


def test_multidoc2dial_distractors_seeded():
    a = loaders.load_multidoc2dial(MD2D_DIAL, MD2D_DOC, distractors=1, seed=0)
    assert a == loaders.load_multidoc2dial(MD2D_DIAL, MD2D_DOC, distractors=1, seed=0)
    seeds = [
        loaders.load_multidoc2dial(MD2D_DIAL, MD2D_DOC, distractors=1, seed=s) for s in range(8)
    ]
    assert len({json.dumps(r) for r in seeds}) > 1
    car = a[3]["documents"]
    assert len(car) == 2 and car[0]["title"] == "Register a new vehicle"
    assert car[1]["title"] in {"Renew your license online", "Replace a lost plate"}
    assert len(a[4]["documents"]) == 1  # ssa has no other document to draw


def test_nq():
    recs = loaders.load_nq(NQ)
    assert [r["id"] for r in recs] == ["nq-101", "nq-102", "nq-103", "nq-104"]
    assert [r["answerable"] for r in recs] == [True, True, True, False]
    assert [r["response"] for r in recs] == [
        "1862",
        "The climate is mild, with wet winters and cool summers.",  # long answer only
        "No.",
        GOLD_REFUSAL,
    ]
    assert recs[0]["documents"] == [
        {"title": "Port Elvin", "text": "Its harbour was built in 1862 by local merchants."}
    ]
    for r in recs:
        assert len(r["documents"]) == 1 and "<" not in r["documents"][0]["text"]
    assert recs[3]["documents"][0]["text"].startswith(("The Lanthorn", "It has seven"))


def test_musique():
    ans = loaders.load_musique(MUSIQUE_ANS, distractors=2)
    assert [(r["id"], r["response"], r["answerable"]) for r in ans] == [
        ("musique-2hop__901_902", "1731", True),
        ("musique-2hop__903_904", "Tarnmouth", True),
    ]
    titles = {d["title"] for d in ans[0]["documents"]}
    assert {"Orla Vance", "Kestrel Bay"} <= titles and len(titles) == 4  # 2 supporting + 2
    assert len(loaders.load_musique(MUSIQUE_ANS, distractors=0)[0]["documents"]) == 2
    full = loaders.load_musique(MUSIQUE_FULL)
    assert [r["id"] for r in full] == [
        "musique-2hop__901_902",
        "musique-2hop__901_902-unanswerable",
    ]
    assert full[1]["response"] == GOLD_REFUSAL and full[1]["answerable"] is False
    assert "Kestrel Bay" not in {d["title"] for d in full[1]["documents"]}
    assert len(full[1]["documents"]) == 1 + 3  # the supporting paragraph left + 3 distractors


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_malformed_inputs_name_the_field(tmp_path):
    dial = json.loads(MD2D_DIAL.read_text())
    del dial["dial_data"]["dmv"][0]["turns"][1]["role"]
    bad = tmp_path / "multidoc2dial_dial_train.json"
    bad.write_text(json.dumps(dial))
    with pytest.raises(InputError, match=r"dial_data\.dmv\[0\]\.turns\[1\]\.role") as e:
        loaders.load_multidoc2dial(bad, MD2D_DOC)
    assert e.value.file == str(bad)

    dial = json.loads(MD2D_DIAL.read_text())
    dial["dial_data"]["dmv"][0]["turns"][0]["references"][0]["doc_id"] = "nope"
    bad.write_text(json.dumps(dial))
    with pytest.raises(InputError, match="unknown document 'nope'"):
        loaders.load_multidoc2dial(bad, MD2D_DOC)

    rows = [json.loads(line) for line in NQ.read_text().splitlines()]
    del rows[1]["question_text"]
    with pytest.raises(InputError) as e:
        loaders.load_nq(_write_jsonl(tmp_path / "nq.jsonl", rows))
    assert (e.value.line, e.value.field) == (2, "question_text")
    rows = [json.loads(line) for line in NQ.read_text().splitlines()]
    rows[0]["annotations"][0]["short_answers"][0]["end_token"] = 10**6
    with pytest.raises(InputError, match="outside the document") as e:
        loaders.load_nq(_write_jsonl(tmp_path / "nq.jsonl", rows))
    assert e.value.field == "annotations[0].short_answers[0]"

    rows = [json.loads(line) for line in MUSIQUE_ANS.read_text().splitlines()]
    rows[1]["paragraphs"][0]["paragraph_text"] = None
    with pytest.raises(InputError) as e:
        loaders.load_musique(_write_jsonl(tmp_path / "m.jsonl", rows))
    assert (e.value.line, e.value.field) == (2, "paragraphs[0].paragraph_text")
    (tmp_path / "m.jsonl").write_text(MUSIQUE_ANS.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(InputError, match="malformed JSON") as e:
        loaders.load_musique(tmp_path / "m.jsonl")
    assert e.value.line == 2


# ---------------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "ood.jsonl"
    assert main(["builtin", "ood", "--seed", "2", "--out", str(out)]) == 0
    assert [e.to_record() for e in load_examples(out)] == generate("ood", 2)
    assert "200 examples (answerable 70.0%, multi-turn 40.0%)" in capsys.readouterr().out

    cases = {
        "multidoc2dial": [str(MD2D_DIAL.parent)],
        "nq": [str(NQ)],
        "musique": [str(MUSIQUE_ANS)],
    }
    for fmt, inputs in cases.items():
        out = tmp_path / f"{fmt}.jsonl"
        assert main(["convert", fmt, *inputs, "--out", str(out)]) == 0
        assert len(load_examples(out)) == {"multidoc2dial": 6, "nq": 4, "musique": 2}[fmt]
    assert "6 examples (answerable 66.7%" in capsys.readouterr().out.splitlines()[0]

    # the same question in both MuSiQue versions: a duplicate id, refused with exit code 2
    args = ["convert", "musique", str(MUSIQUE_ANS), str(MUSIQUE_FULL), "--out", str(out)]
    assert main(args) == 2
    assert "duplicate id 'musique-2hop__901_902'" in capsys.readouterr().err


def test_data_side_imports_neither_torch_nor_upward(tmp_path):
    """Reading data and materializing a builtin split need no torch; `ssrengine.data.records` (the
    record format) imports neither the generator nor the loaders, which build on it."""
    code = (
        "import sys\n"
        "import ssrengine.data.records\n"
        "assert not {'ssrengine.data.builtin', 'ssrengine.data.loaders'} & set(sys.modules)\n"
        "from ssrengine.data.builtin import resolve_data_file\n"
        "from ssrengine.data import loaders\n"
        "ssrengine.data.records.load_examples(resolve_data_file('builtin:validation', seed=3))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = {**os.environ, "SSRENGINE_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-1500:]


def test_gzipped_jsonl_reads_like_plain(tmp_path):
    rows = generate("validation", 3)[:3]
    plain, packed = tmp_path / "a.jsonl", tmp_path / "a.jsonl.gz"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    assert list(iter_jsonl(packed)) == list(iter_jsonl(plain)) == list(enumerate(rows, 1))
