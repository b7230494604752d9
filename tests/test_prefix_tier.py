import torch

from ssrengine.core.config_load import load_config
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import GENERATIONS, GenerationRow, RunDir
from ssrengine.data.records import encode_prompt, load_examples, parse_record, prompt_messages
from ssrengine.models.loading import load_model, load_tokenizer
from ssrengine.rehearsal.build import run_build
from ssrengine.rehearsal.judge import RuleJudge
from ssrengine.rehearsal.prefix_tier import (
    candidate,
    continuation,
    decision_prefix,
    first_sentence,
    prompt_ids,
)
from ssrengine.rehearsal.stages import judge_rows, run_prefix, verdict_input_hash
from tests import rows
from tests.tiny import records, write_jsonl


def test_sentences_prefix_and_candidate():
    assert first_sentence("It costs 3.5 euros. Then more.") == "It costs 3.5 euros."
    assert first_sentence(" where it is based! And") == " where it is based!"
    assert first_sentence("no end here") == "no end here"
    u, a = (parse_record(r, file="t", line=1) for r in records(2))
    assert decision_prefix(u) == "The documents do not say"
    assert decision_prefix(a) == "Founded in 1901"
    assert candidate(u, " where Acme's CEO is named. It is") == (
        "The documents do not say where Acme's CEO is named."
    )
    assert candidate(a, ", in Oslo.\nMore") == "Founded in 1901, in Oslo."


def _row(tok, e_id: str, text: str) -> GenerationRow:
    """A continuation row as every backend stores one: its token ids, its text stripped."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return GenerationRow(e_id, text.strip(), ids, "stop", "hf", "m", "h")


def test_continuation_keeps_the_space_the_stored_text_lost(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    u, a = (parse_record(r, file="t", line=1) for r in records(2))
    row = _row(tok, u.id, " where Acme's CEO is named. It is")
    assert row.response == "where Acme's CEO is named. It is"  # the space is gone
    assert continuation(tok, u, row) == " where Acme's CEO is named. It is"
    assert candidate(u, continuation(tok, u, row)) == (
        "The documents do not say where Acme's CEO is named."
    )
    row = _row(tok, a.id, ", in Oslo.")
    assert candidate(a, continuation(tok, a, row)) == "Founded in 1901, in Oslo."
    # without token ids: a space before a word, none before punctuation
    bare = GenerationRow(u.id, "where it is.", [], "stop", "hf", "m", "h")
    assert continuation(tok, u, bare) == " where it is."
    bare = GenerationRow(a.id, ", in Oslo.", [], "stop", "hf", "m", "h")
    assert continuation(tok, a, bare) == ", in Oslo."


def _cfg(tiny_model_dir, data, run, *extra):
    return load_config(None, [
        f"--model.path={tiny_model_dir}", f"--data.train_file={data}", f"--run.dir={run}",
        "--generation.max_new_tokens=5", "--generation.batch_size=4", "--judge.prefix=true",
        *extra,
    ])  # fmt: skip


def test_prefix_tier_continues_the_forced_gold_decision(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    examples = load_examples(data)
    cfg = _cfg(tiny_model_dir, data, tmp_path)
    tok = load_tokenizer(str(tiny_model_dir))
    p_ids = {}
    for e in examples:
        ids = prompt_ids(tok, cfg, e)
        p = encode_prompt(tok, prompt_messages(e.messages, e.documents, cfg.data.system_prompt))
        p_ids[e.id] = p
        assert ids[: len(p)] == p
        assert tok.decode(ids[len(p) :]) == decision_prefix(e)
    run_prefix(cfg, tmp_path, examples)
    rows = {r["id"]: r for r in read_rows(RunDir(tmp_path).prefixes)}
    verdicts = read_rows(RunDir(tmp_path).prefix_verdicts)
    assert set(rows) == {e.id for e in examples} and len(verdicts) == len(examples)
    # the continuation is the model's greedy one after prompt + forced prefix
    model = load_model(str(tiny_model_dir), device="cpu")
    for e in examples:
        ids = torch.tensor([prompt_ids(tok, cfg, e)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :]
        got = rows[e.id]["token_ids"]
        assert got == out.tolist()[: len(got)]
    # each judged candidate is the forced prefix and the continuation decoded together
    judged = {v["id"]: v["input_hash"] for v in verdicts}
    for e in examples:
        forced = prompt_ids(tok, cfg, e)[len(p_ids[e.id]) :]
        text = first_sentence(tok.decode(forced + rows[e.id]["token_ids"])).strip()
        assert judged[e.id] == verdict_input_hash(e, text)


def test_build_takes_accepted_prefix_completions(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    examples = load_examples(data)
    cfg = _cfg(tiny_model_dir, data, tmp_path, "--run.mode=ssr")
    # own answers: all rejected (wrong everywhere)
    own = {
        e.id: "Founded in 1850." if e.answerable is False else "I like trains." for e in examples
    }
    write_jsonl(tmp_path / GENERATIONS, rows.generations(cfg, examples, own))
    judge_rows(cfg, tmp_path, examples, own, RuleJudge(cfg.judge.min_f1))
    # continuations: a clean one on every example, written as the prefix stage writes them
    cont = {e.id: " about that. Extra words" if not e.answerable else "." for e in examples}
    tok = load_tokenizer(str(tiny_model_dir))
    write_jsonl(RunDir(tmp_path).prefixes, [_row(tok, i, c).to_json() for i, c in cont.items()])
    cands = {e.id: candidate(e, cont[e.id]) for e in examples}
    judge_rows(cfg, tmp_path, examples, cands, RuleJudge(cfg.judge.min_f1),
               path=RunDir(tmp_path).prefix_verdicts)  # fmt: skip
    stats = run_build(cfg, tmp_path, examples)
    built = {r["id"]: r for r in read_rows(RunDir(tmp_path).rehearsal)}
    assert stats.overall.prefix == len(examples) and stats.overall.gold == 0
    assert built["ex-000"]["target"] == "The documents do not say about that."
    assert built["ex-001"]["target"] == "Founded in 1901."
    assert all(r["source"] == "prefix" for r in built.values())
    # a continuation changed after judging: its verdict is stale, the example goes to gold
    cont["ex-000"] = " something else."
    write_jsonl(RunDir(tmp_path).prefixes, [_row(tok, i, c).to_json() for i, c in cont.items()])
    run_build(cfg, tmp_path, examples)
    assert read_rows(RunDir(tmp_path).rehearsal)[0]["source"] == "gold"
