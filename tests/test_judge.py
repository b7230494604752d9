import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.core.config import Config, JudgeConfig, ModelConfig
from ssrengine.core.config_load import build_config
from ssrengine.core.errors import InputError
from ssrengine.data.records import Example
from ssrengine.generation.base import Completion
from ssrengine.generation.hf import HFGenerator
from ssrengine.rehearsal.judge import (
    LLMJudge,
    ParaphraseFilter,
    RuleJudge,
    content_words,
    echo_overlap,
    gold_declines,
    is_refusal,
    judge_messages,
    load_user_judge,
    make_judge,
    paraphrase_judge,
    token_f1,
)
from ssrengine.rehearsal.stages import paraphrase_messages


def ex(response, answerable=True):
    return Example(
        id="e",
        messages=[{"role": "user", "content": "q"}],
        response=response,
        answerable=answerable,
    )


@pytest.mark.parametrize(
    ("gold", "answerable", "cand", "accept"),
    [
        ("Founded in 1987.", True, "Acme was founded in 1987.", True),
        (
            "Founded in 1987.",
            True,
            "It was founded in 1990 by a group of engineers in Oslo.",
            False,
        ),
        ("Founded in 1987.", True, "The documents do not mention when it was founded.", False),
        ("The documents do not say.", False, "The documents don't say who the CEO is.", True),
        ("The documents do not say.", False, "The CEO is Mara Quill.", False),
        ("Founded in 1987.", True, "   ", False),
        ("Founded in 1987.", True, "It was founded in 1990.", False),
        ("3,380 employees.", True, "Fefa Works has 3380 employees.", True),
    ],
)
def test_rule_judge(gold, answerable, cand, accept):
    v = RuleJudge(0.5).judge(ex(gold, answerable), cand)
    assert v.accept is accept and 0.0 <= v.score <= 1.0 and v.reason


def test_token_f1_and_refusals():
    assert token_f1("The capital is Paris", "Paris") == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert token_f1("x", "y") == 0.0
    for text in [
        "The documents do not say.",
        "This information is not provided.",
        "I cannot answer that.",
    ]:
        assert is_refusal(text)
    assert not is_refusal("Acme was founded in 1987.")


def test_llm_judge_reads_p_yes_from_next_token_logprobs(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = HFGenerator(ModelConfig(path=str(tiny_model_dir)), hf_model=model, tokenizer=tok)
    judge = LLMJudge(gen, threshold=0.5)
    e = ex("Founded in 1987.")
    v = judge.judge(e, "Acme was founded in 1987.")
    # Reference: the same prompt through a plain forward pass.
    ids = gen.tokenize(judge_messages(e, "Acme was founded in 1987."))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    ly, ln = logp[judge.yes].item(), logp[judge.no].item()
    want = math.exp(ly) / (math.exp(ly) + math.exp(ln))
    assert v.score == pytest.approx(want, abs=1e-5)
    assert v.accept is (want >= 0.5)
    assert judge.judge_batch([e, e], ["a", "b"])[0].score == pytest.approx(
        judge.judge(e, "a").score, abs=1e-5
    )


# An answerable question whose gold answer contains a refusal phrase: the label decides.
HEDGED = "The documents do not mention the fee, but the deadline is 5 May."


@pytest.mark.parametrize(
    ("cand", "accept"),
    [
        ("The deadline is 5 May; the fee is not stated.", True),
        (HEDGED, True),
        ("I don't know.", False),
        ("The documents do not say.", False),
    ],
)
def test_answerable_gold_that_reads_as_a_refusal_is_judged_on_content(cand, accept):
    e = ex(HEDGED, answerable=True)
    assert not gold_declines(e)
    v = RuleJudge(0.3).judge(e, cand)
    assert v.accept is accept, v.reason


def test_gold_declines_is_the_label_else_the_text():
    assert gold_declines(ex("Founded in 1987.", answerable=False))
    assert not gold_declines(ex("The documents do not say.", answerable=True))
    assert gold_declines(ex("The documents do not say.", answerable=None))
    assert not gold_declines(ex("Founded in 1987.", answerable=None))


# ---------------------------------------------------------------- configured and user judges


def judge_cfg(**judge):
    return build_config({"judge": judge})


def test_refusal_patterns_extend_the_rule_judge():
    gold = ex("Not in the passage.", answerable=None)  # no label: the gold text decides
    cand = "The passage is silent on that."
    plain = make_judge(judge_cfg())
    own = make_judge(judge_cfg(refusal_patterns=r"not in the passage|passage is silent"))
    assert not plain.judge(gold, cand).accept  # neither phrase reads as a refusal built in
    assert own.judge(gold, cand).accept
    assert own.judge(ex("Founded in 1987."), cand).reason == "declines an answerable question"
    assert own.name != plain.name  # a different judge: verdicts are redone, not reused


def test_bad_refusal_pattern_is_one_line():
    with pytest.raises(InputError, match=r"field 'judge.refusal_patterns': not a valid regular"):
        make_judge(judge_cfg(refusal_patterns="(unclosed"))


class RecordingGenerator:
    """Answers "Yes" with logprobs and keeps the requests (the judge's prompts)."""

    model = "rec"
    backend = "test"

    def __init__(self):
        self.requests = []

    def token_id(self, text):
        return {"Yes": 1, "No": 2}[text]

    def generate(self, requests, sampling):
        self.requests += list(requests)
        return [Completion("", [], "length", [{1: -0.1, 2: -3.0}]) for _ in requests]


def test_rubric_file_is_the_llm_judges_system_message(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Grade leniently. Reply Yes or No.\n")
    gen = RecordingGenerator()
    judge = make_judge(judge_cfg(kind="llm", rubric=str(rubric)), gen)
    assert judge.judge(ex("Founded in 1987."), "1987.").accept
    assert gen.requests[0].messages[0] == {
        "role": "system",
        "content": "Grade leniently. Reply Yes or No.",
    }
    assert judge.name != make_judge(judge_cfg(kind="llm"), gen).name


def test_missing_rubric_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"nope.txt: field 'judge.rubric': rubric file not found"):
        make_judge(judge_cfg(kind="llm", rubric=str(tmp_path / "nope.txt")), RecordingGenerator())


USER_JUDGES = """
from ssrengine.rehearsal.judge import Verdict


def exact(example, candidate):
    return candidate.strip() == example.response


def scored(example, candidate):
    return Verdict(len(candidate) < 20, 0.5, "short")


def broken(example, candidate):
    return "yes"


class Lenient:
    name = "lenient-v1"

    def judge(self, example, candidate):
        return Verdict(True, 1.0, "always")

    def judge_batch(self, examples, candidates):
        return [self.judge(e, c) for e, c in zip(examples, candidates)]


class NeedsArgs:
    def __init__(self, x):
        pass

    def judge(self, example, candidate):
        return True


NOT_A_JUDGE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(USER_JUDGES)
    monkeypatch.chdir(tmp_path)  # imported from the current directory
    yield "my_judges"
    sys.modules.pop("my_judges", None)


def test_python_function_judge(user_module):
    judge = make_judge(judge_cfg(kind=f"python:{user_module}:exact"))
    assert judge.judge(ex("Founded in 1987."), "Founded in 1987. ").accept
    assert not judge.judge(ex("Founded in 1987."), "1987").accept
    assert judge.name.startswith("python:my_judges:exact@")
    v = make_judge(judge_cfg(kind=f"python:{user_module}:scored")).judge_batch(
        [ex("a"), ex("b")], ["short", "a much longer answer than that"]
    )
    assert [x.accept for x in v] == [True, False] and v[0].reason == "short"


def test_python_class_judge_keeps_its_name(user_module):
    judge = make_judge(judge_cfg(kind=f"python:{user_module}:Lenient"))
    assert judge.name == "lenient-v1"
    assert judge.judge_batch([ex("a")], ["b"])[0].accept


def test_edited_function_judge_changes_its_name(tmp_path, user_module):
    before = make_judge(judge_cfg(kind=f"python:{user_module}:exact")).name
    (tmp_path / "my_judges.py").write_text(USER_JUDGES.replace("candidate.strip()", "candidate"))
    sys.modules.pop("my_judges")
    after = make_judge(judge_cfg(kind=f"python:{user_module}:exact")).name
    assert before != after


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("python:my_judges:missing", "module 'my_judges' has no 'missing'"),
        ("python:my_judges:NOT_A_JUDGE", "expected a function"),
        ("python:my_judges:NeedsArgs", "cannot build the judge class with no arguments"),
    ],
)
def test_bad_judge_spec_is_one_line(user_module, kind, needle):
    with pytest.raises(InputError) as e:
        make_judge(judge_cfg(kind=kind))
    assert "field 'judge.kind'" in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", ["python:my_judges", "regex", "python::f"])
def test_malformed_judge_kind_fails_at_config_load(kind):
    with pytest.raises(InputError, match=rf"judge.kind: got '{kind}', expected a value matching"):
        judge_cfg(kind=kind)
    with pytest.raises(
        InputError, match=r"field 'judge.kind': .*(expected python:MODULE:NAME|unknown judge)"
    ):
        load_user_judge(kind) if kind.startswith("python:") else make_judge(
            Config(judge=JudgeConfig(kind=kind))
        )


def test_user_judge_with_a_wrong_return_type_is_one_line(user_module):
    judge = make_judge(judge_cfg(kind=f"python:{user_module}:broken"))
    with pytest.raises(InputError, match=r"returned str; expected a Verdict or a bool"):
        judge.judge(ex("a"), "b")


def test_cli_run_with_a_judge_that_cannot_load_stops_before_generate(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssrengine", "run", "--judge.kind=python:nowhere_xyz:f"]
    res = subprocess.run([*cmd, f"--run.dir={run}"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: field 'judge.kind': 'python:nowhere_xyz:f': cannot import"), last
    assert not (run / "generations.jsonl").exists()


RAVI = Example(
    id="ravi",
    messages=[{"role": "user", "content": "Who founded Vebraton Labs?"}],
    response="Ravi Zainte.",
    documents=[
        {"title": "Vebraton Labs", "text": "Vebraton Labs was founded by Ravi Zainte in 1987."}
    ],
    answerable=True,
)


def test_grounding_rejects_content_words_from_nowhere():
    cand = "Ravi Zainte is a fictional character from the movie 'The Mandalorian.'"
    assert RuleJudge(0.3).judge(RAVI, cand).accept  # the defect: F1 alone lets it through
    grounded = RuleJudge(0.3, grounding=True)
    v = grounded.judge(RAVI, cand)
    assert not v.accept
    assert "fictional, character, movie, mandalorian" in v.reason
    # words of the documents, the question and the gold answer are grounded (plurals too)
    assert grounded.judge(RAVI, "Vebraton Labs was founded by Ravi Zainte.").accept
    assert grounded.judge(RAVI, "Ravi Zainte founded the labs in 1987.").accept
    assert not grounded.judge(RAVI, "Ravi Zainte, in 1990.").accept  # numbers count too
    # the tolerance, and refusals are not grounding-checked
    assert RuleJudge(0.3, grounding=True, max_ungrounded=4).judge(RAVI, cand).accept
    unanswerable = replace(RAVI, response="The documents do not say.", answerable=False)
    assert grounded.judge(unanswerable, "The documents do not mention who founded it.").accept
    # on, the name changes so every verdict is redone; off, it is what it was
    assert "grounded" not in RuleJudge(0.3).name
    assert grounded.name != RuleJudge(0.3).name


def test_grounding_is_configured():
    cfg = build_config({"judge": {"grounding": True, "max_ungrounded": 2}})
    j = make_judge(cfg)
    assert isinstance(j, RuleJudge) and j.grounding and j.max_ungrounded == 2
    with pytest.raises(InputError, match=r"judge\.max_ungrounded"):
        build_config({"judge": {"max_ungrounded": -1}})


def test_content_words():
    assert content_words("The CEO's 3,380 employees don't say it, the text states.") == [
        "ceo",
        "3380",
        "employees",
    ]


def test_paraphrase_filter_rejects_echoes_and_ungrounded_words():
    unanswerable = replace(RAVI, response="The documents do not say.", answerable=False)
    cfg = build_config({})
    pj = paraphrase_judge(cfg, RuleJudge(0.3))
    echo = 'A correct answer is: "The documents do not say."'
    assert RuleJudge(0.3).judge(unanswerable, echo).accept  # the defect the filter is for
    v = pj.judge(unanswerable, echo)
    assert not v.accept and "echoes" in v.reason
    restated = "Answer the question yourself in your own words: the documents do not say."
    v = pj.judge(unanswerable, restated)
    assert not v.accept and "echoes" in v.reason and echo_overlap(restated) >= 0.5
    assert pj.judge(unanswerable, "The documents do not say who founded Vebraton Labs.").accept
    assert pj.judge(RAVI, "It was founded by Ravi Zainte.").accept
    v = pj.judge(RAVI, "Ravi Zainte is a fictional character from the movie 'The Mandalorian.'")
    assert not v.accept and "mandalorian" in v.reason
    # the request the tier sends is the text the filter measures against
    ask = paraphrase_messages(cfg, unanswerable)[-1]["content"]
    assert ask.startswith("Who founded Vebraton Labs?") and echo_overlap(ask) >= 0.5
    assert pj.name.startswith(RuleJudge(0.3).name) and pj.name != RuleJudge(0.3).name
    off = build_config({"judge": {"paraphrase_filter": False}})
    assert paraphrase_judge(off, RuleJudge(0.3)).judge(unanswerable, echo).accept


def test_paraphrase_filter_asks_the_inner_judge_only_what_passes():
    seen = []

    class Counting(RuleJudge):
        def judge_batch(self, exs, cs):
            seen.extend(cs)
            return super().judge_batch(exs, cs)

    pj = ParaphraseFilter(Counting(0.3))
    cands = ['A correct answer is: "Ravi Zainte."', "Ravi Zainte.", "Ravi Zainte of Mars."]
    out = pj.judge_batch([RAVI] * 3, cands)
    assert [v.accept for v in out] == [False, True, False]
    assert seen == ["Ravi Zainte."]


@pytest.mark.parametrize(
    "gold, candidate, accepted",
    [
        ("4.", "The answer to this classic math problem is 4.", True),  # F1 0.22
        ("Founded in 1987.", "The company was founded in 1987.", True),
        ("Founded in 1987.", "The company was founded in 1990.", False),
        ("Mara Quill.", "The CEO is John Smith.", False),  # fluent and wrong
        ("Mara Quill.", "Mara Quill leads the company.", True),
        ("In Oslo.", "It is in Bergen.", False),
        ("In Oslo.", "Acme is based in Oslo, Norway.", True),
        ("Blue and green.", "They are blue and green.", True),  # no key values: content words
        ("Blue and green.", "Blue.", False),
    ],
)
def test_contains_match_accepts_correct_answers_in_other_words(gold, candidate, accepted):
    from ssrengine.rehearsal.judge import RuleJudge

    ex = Example(id="x", documents=[], messages=[{"role": "user", "content": "?"}],
                 response=gold, answerable=True)  # fmt: skip
    verdict = RuleJudge(match="contains").judge(ex, candidate)
    assert verdict.accept is accepted, verdict.reason
    if gold == "4.":  # the F1 rule rejects it
        assert not RuleJudge(min_f1=0.3).judge(ex, candidate).accept


def test_contains_match_has_its_own_resume_key():
    from ssrengine.rehearsal.judge import RuleJudge

    assert RuleJudge(match="contains").name != RuleJudge().name
    assert RuleJudge().name.startswith("rule(f1>=0.3,numbers,")  # the match option adds nothing
