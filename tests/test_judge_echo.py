"""The rule judge's echo check: a candidate that repeats the instruction it was given (the
system prompt, the record's own system message, the paraphrase request) is rejected before
the refusal check, which it would otherwise pass ("If the documents do not contain the answer,
say so." reads as a refusal); refusals in the model's own words still pass."""

from __future__ import annotations

import pytest

from ssrengine.core.config import Config
from ssrengine.core.config_load import build_config
from ssrengine.data.records import Example
from ssrengine.rehearsal.judge import (
    PARAPHRASE_ASK,
    RuleJudge,
    echo_verdict,
    instruction_echo,
    is_refusal,
    make_judge,
)

SYSTEM = Config().data.system_prompt  # "Answer the question using only the documents. If ..."
ECHO = "If the documents do not contain the answer, say so."


def ex(response: str, answerable: bool, system: str | None = None) -> Example:
    messages = [{"role": "user", "content": "Who is the CEO of Acme?"}]
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return Example(id="e", messages=messages, response=response, answerable=answerable)


def test_the_defect_an_echo_reads_as_a_refusal():
    assert ECHO in SYSTEM and is_refusal(ECHO)


@pytest.mark.parametrize(
    "cand",
    [
        ECHO,
        "if the documents do not contain the answer say so",
        "Answer the question using only the documents.",
        f"{SYSTEM} The CEO is not mentioned.",
        "The documents do not contain the answer, say so.",  # 5 of the sentence's 6 trigrams
    ],
)
def test_echoes_of_the_system_prompt_are_rejected(cand):
    judge = make_judge(build_config({}))
    for gold, answerable in (("The documents do not say.", False), ("Mara Quill.", True)):
        v = judge.judge(ex(gold, answerable), cand)
        assert not v.accept and v.reason.startswith("echoes the instruction"), (cand, v)


@pytest.mark.parametrize(
    "cand",
    [
        "The documents do not contain the answer.",
        "The documents do not say who the CEO is.",
        "I cannot find the answer in the documents.",
        "The answer is not provided in the documents, so I cannot say.",
    ],
)
def test_refusals_in_own_words_still_pass(cand):
    judge = make_judge(build_config({}))
    assert instruction_echo(cand, SYSTEM) < 0.8
    assert judge.judge(ex("The documents do not say.", False), cand).accept


def test_the_records_own_system_message_and_the_paraphrase_request_count():
    own = "Reply from the passages only. When the passages are silent, reply that they are silent."
    judge = RuleJudge(echo_of=())  # no data.system_prompt: the record's own and the request's
    cand = "When the passages are silent, reply that they are silent."
    assert not judge.judge(ex("They are silent.", False, system=own), cand).accept
    assert echo_verdict(ex("They are silent.", False), cand) is None  # nothing to echo there
    v = judge.judge(ex("Founded in 1987.", True), f"{PARAPHRASE_ASK} Founded in 1987.")
    assert not v.accept and "echoes the instruction" in v.reason


def test_a_sentence_the_gold_repeats_is_no_echo():
    gold = "If the documents do not contain the answer, say so."  # a gold that quotes it
    judge = make_judge(build_config({}))
    assert judge.judge(ex(gold, True), ECHO).accept


def test_the_judge_name_changes_with_the_check_and_the_system_prompt():
    plain = make_judge(build_config({})).name
    other = make_judge(build_config({"data": {"system_prompt": "Be brief and exact."}})).name
    assert "no_echo=" in plain and plain != other
    assert plain.startswith("rule(f1>=0.3,numbers,")  # the old key was rule(f1>=0.3,numbers)
    assert RuleJudge().name == plain  # the defaults: checked against the default system prompt
