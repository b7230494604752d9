"""Judges decide whether the base model's own answer is an acceptable target.

Three kinds (`make_judge` picks one from ``judge.kind``): a rule judge (refusal agreement +
answer token-F1, the CPU default), an LLM judge that reads P(Yes) vs P(No) from one step of
next-token logprobs on any backend, and a user's own (``python:MODULE:NAME``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ssrengine.config import Config
from ssrengine.data import Example, render_documents
from ssrengine.errors import InputError
from ssrengine.generation.base import Generator, Request, SamplingParams


@dataclass(frozen=True)
class Verdict:
    accept: bool
    score: float
    reason: str


class Judge(Protocol):
    name: str  # recorded in verdicts.jsonl; part of the resume key

    def judge(self, example: Example, candidate: str) -> Verdict: ...

    def judge_batch(
        self, examples: Sequence[Example], candidates: Sequence[str]
    ) -> list[Verdict]: ...


_REFUSAL = re.compile(
    r"\b(do(es)?( not|n'?t) (say|mention|contain|provide|specify|state|include|have|answer)|"
    r"(is|are) not (mentioned|provided|specified|stated|given|available|included)|"
    r"no (information|mention|details?|answer)|not (enough|sufficient) information|"
    r"cannot (be )?(answer|determine|find)|can't (answer|determine|find)|unable to (answer|determine|find)|"
    r"unanswerable|i don'?t know|not possible to (answer|determine)|does not appear)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """Whether an answer declines to answer from the documents (gold templates and model phrasings)."""
    return bool(_REFUSAL.search(text))


def gold_declines(example: Example) -> bool:
    """Whether the gold answer declines (the question is unanswerable from the documents): the
    answerable label where the record has one, else whether the gold text reads as a refusal."""
    if example.answerable is not None:
        return not example.answerable
    return is_refusal(example.response)


def _normalize_tokens(text: str) -> list[str]:
    """SQuAD-style: lowercase, drop punctuation and articles, split on whitespace."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return [t for t in text.split() if t not in ("a", "an", "the")]


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def token_f1(candidate: str, reference: str) -> float:
    c, r = _normalize_tokens(candidate), _normalize_tokens(reference)
    common = sum((Counter(c) & Counter(r)).values())
    if not c or not r or common == 0:
        return 0.0
    p, rec = common / len(c), common / len(r)
    return 2 * p * rec / (p + rec)


def token_recall(candidate: str, reference: str) -> float:
    c, r = _normalize_tokens(candidate), _normalize_tokens(reference)
    return sum((Counter(c) & Counter(r)).values()) / len(r) if r else 0.0


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def compile_patterns(patterns: str, *, field: str = "judge.refusal_patterns") -> re.Pattern[str]:
    """A user's refusal regex (Python `re`, case-insensitive), or one clear error."""
    try:
        return re.compile(patterns, re.IGNORECASE)
    except re.error as e:
        raise InputError(f"not a valid regular expression: {e}", field=field) from None


class RuleJudge:
    """Accept when candidate and gold agree on refusing, and an answer has token-F1 ≥ min_f1
    and contains every number of the gold answer (F1 alone accepts "founded in 1990" for
    "Founded in 1987."). ``refusal_patterns``: a regex that also marks a refusal, beside the
    built-in phrases (a dataset's own refusal wording)."""

    def __init__(self, min_f1: float = 0.3, refusal_patterns: str = "") -> None:
        self.min_f1 = min_f1
        self.extra = compile_patterns(refusal_patterns) if refusal_patterns else None
        extra = f",refusal+={_short_hash(refusal_patterns)}" if refusal_patterns else ""
        self.name = f"rule(f1>={min_f1:g},numbers{extra})"

    def refuses(self, text: str) -> bool:
        return is_refusal(text) or bool(self.extra and self.extra.search(text))

    def gold_declines(self, example: Example) -> bool:
        if example.answerable is not None:
            return not example.answerable
        return self.refuses(example.response)

    def judge(self, example: Example, candidate: str) -> Verdict:
        if not candidate.strip():
            return Verdict(False, 0.0, "empty answer")
        cand_refuses = self.refuses(candidate)
        if self.gold_declines(example):
            if cand_refuses:
                return Verdict(True, 1.0, "both decline: unanswerable from the documents")
            return Verdict(False, 0.0, "answers a question the documents cannot answer")
        # A gold answer that itself reads as a refusal ("it does not say X, but Y") leaves the
        # phrase no evidence of declining: the candidate is scored on its content instead.
        if cand_refuses and not self.refuses(example.response):
            return Verdict(False, 0.0, "declines an answerable question")
        f1 = token_f1(candidate, example.response)
        missing = sorted(set(_numbers(example.response)) - set(_numbers(candidate)))
        if missing:
            return Verdict(False, f1, f"token F1 {f1:.2f}, but misses {', '.join(missing)}")
        ok = f1 >= self.min_f1
        return Verdict(ok, f1, f"token F1 {f1:.2f} {'>=' if ok else '<'} {self.min_f1:g}")

    def judge_batch(self, examples: Sequence[Example], candidates: Sequence[str]) -> list[Verdict]:
        return [self.judge(e, c) for e, c in zip(examples, candidates)]


# The fixed rubric goes first and the example last, so a prefix cache (SGLang's RadixAttention)
# shares the rubric's KV across every judge call.
RUBRIC = (
    "You are a strict grader of answers to questions about documents. You are given documents, "
    "a conversation, a reference answer written by an annotator and a candidate answer. The "
    "candidate is acceptable if it is correct and consistent with the reference answer and the "
    "documents: it must give the same information (wording may differ, extra correct detail is "
    "fine), and if the reference says the documents do not contain the answer, the candidate "
    "must also decline to answer. Reply with one word: Yes if acceptable, No otherwise."
)


def judge_messages(example: Example, candidate: str, rubric: str = RUBRIC) -> list[dict[str, str]]:
    dialog = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in example.messages)
    body = (
        f"Documents:\n{render_documents(example.documents) or '(none)'}\n\n"
        f"Conversation:\n{dialog}\n\n"
        f"Reference answer: {example.response}\n"
        f"Candidate answer: {candidate}\n\n"
        "Is the candidate answer acceptable? Answer Yes or No."
    )
    return [{"role": "system", "content": rubric}, {"role": "user", "content": body}]


class LLMJudge:
    """P(Yes)/(P(Yes)+P(No)) from one prefill + one decode step; accept at ``threshold``.

    Where a backend returns no logprobs, falls back to constrained choice: the first generated
    word must be Yes or No. ``rubric``: the system message that states the grading rules (it
    must ask for a one-word Yes or No)."""

    def __init__(self, generator: Generator, threshold: float = 0.5, rubric: str = RUBRIC) -> None:
        self.gen = generator
        self.threshold = threshold
        self.rubric = rubric
        own = f",rubric={_short_hash(rubric)}" if rubric != RUBRIC else ""
        self.name = f"llm({generator.model},p>={threshold:g}{own})"

    @functools.cached_property
    def yes(self) -> int:
        return self.gen.token_id("Yes")

    @functools.cached_property
    def no(self) -> int:
        return self.gen.token_id("No")

    def judge(self, example: Example, candidate: str) -> Verdict:
        return self.judge_batch([example], [candidate])[0]

    def judge_batch(self, examples: Sequence[Example], candidates: Sequence[str]) -> list[Verdict]:
        reqs = [
            Request(messages=judge_messages(e, c, self.rubric))
            for e, c in zip(examples, candidates)
        ]
        outs = self.gen.generate(
            reqs, SamplingParams(max_new_tokens=1, logprob_token_ids=(self.yes, self.no))
        )
        verdicts = []
        for out in outs:
            if out.logprobs:
                ly, ln = out.logprobs[0][self.yes], out.logprobs[0][self.no]
                m = max(ly, ln)
                p = math.exp(ly - m) / (math.exp(ly - m) + math.exp(ln - m))
                ok = p >= self.threshold
                verdicts.append(
                    Verdict(ok, p, f"P(Yes)={p:.3f} {'>=' if ok else '<'} {self.threshold:g}")
                )
                continue
            word = (
                out.text.strip().split()[0].strip(string.punctuation).lower()
                if out.text.strip()
                else ""
            )
            if word in ("yes", "no"):
                verdicts.append(
                    Verdict(word == "yes", float(word == "yes"), f"constrained choice: {word}")
                )
            else:
                verdicts.append(Verdict(False, 0.0, f"unparseable verdict {out.text[:40]!r}"))
        return verdicts


class FunctionJudge:
    """A user's ``(example, candidate) -> Verdict | bool`` as a Judge."""

    def __init__(self, fn: Callable[[Example, str], Verdict | bool], name: str) -> None:
        self.fn, self.name = fn, name

    def judge(self, example: Example, candidate: str) -> Verdict:
        out = self.fn(example, candidate)
        if isinstance(out, Verdict):
            return out
        if isinstance(out, bool):
            return Verdict(out, float(out), f"{self.name}: {'accept' if out else 'reject'}")
        raise InputError(
            f"{self.name} returned {type(out).__name__}; expected a Verdict or a bool",
            field="judge.kind",
        )

    def judge_batch(self, examples: Sequence[Example], candidates: Sequence[str]) -> list[Verdict]:
        return [self.judge(e, c) for e, c in zip(examples, candidates)]


def _source_hash(fn: Any) -> str:
    """Part of a user function's judge name, so an edited function redoes its verdicts."""
    try:
        return _short_hash(inspect.getsource(fn))
    except (OSError, TypeError):  # no source (a builtin, a C extension): the name alone
        return "nosource"


def load_user_judge(spec: str) -> Judge:
    """``python:MODULE:NAME``: NAME is a function ``(example, candidate) -> Verdict | bool``,
    or a class (built with no arguments) or object with a ``judge`` method. MODULE is imported
    from the Python path or the current directory."""

    def bad(msg: str) -> InputError:
        return InputError(f"{spec!r}: {msg}", field="judge.kind")

    parts = spec.split(":")
    if len(parts) != 3 or not all(p.strip() for p in parts[1:]):
        raise bad("expected python:MODULE:NAME (e.g. python:myjudges:exact_match)")
    _, module, attr = parts
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise bad(f"cannot import module {module!r}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = mod
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise bad(f"module {module!r} has no {attr!r}")
        obj = getattr(obj, name)
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise bad(f"cannot build the judge class with no arguments: {e}") from None
    if callable(getattr(obj, "judge", None)):
        if not callable(getattr(obj, "judge_batch", None)):
            return FunctionJudge(obj.judge, str(getattr(obj, "name", spec)))
        if not isinstance(getattr(obj, "name", None), str):
            obj.name = spec
        return obj
    if callable(obj):
        return FunctionJudge(obj, f"{spec}@{_source_hash(obj)}")
    raise bad("expected a function (example, candidate) -> Verdict | bool, or a Judge class")


def make_judge(cfg: Config, generator: Generator | None = None) -> Judge:
    """The judge ``cfg.judge`` names; the LLM judge grades with ``generator``."""
    j = cfg.judge
    if j.kind == "rule":
        return RuleJudge(j.min_f1, j.refusal_patterns)
    if j.kind.startswith("python:"):
        return load_user_judge(j.kind)
    if j.kind != "llm":
        raise InputError(
            f"unknown judge {j.kind!r}; expected rule, llm or python:MODULE:NAME",
            field="judge.kind",
        )
    if generator is None:
        raise InputError("judge.kind = llm needs a generator", field="judge.kind")
    rubric = RUBRIC
    if j.rubric:
        path = Path(j.rubric).expanduser()
        if not path.is_file():
            raise InputError("rubric file not found", file=j.rubric, field="judge.rubric")
        rubric = path.read_text(encoding="utf-8").strip()
        if not rubric:
            raise InputError("empty rubric", file=j.rubric, field="judge.rubric")
    return LLMJudge(generator, j.threshold, rubric)
