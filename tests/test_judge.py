import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.config import ModelConfig
from ssrengine.data import Example
from ssrengine.generation.hf import HFGenerator
from ssrengine.judge import (
    LLMJudge,
    RuleJudge,
    gold_declines,
    is_refusal,
    judge_messages,
    token_f1,
)


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
