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

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.data.records import Example, render_documents
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


# English function words, auxiliaries, the pieces contractions split into, and words that frame
# an answer ("the document states", "a type of"): words that carry no claim, so their absence
# from the documents says nothing about grounding.
_STOPWORD_TEXT = """a an the and or but nor so yet if then than that this these those there here what which
    who whom whose when where why how all any both each few more most other some such no not
    only own same too very just also as at by for from in into of off on onto out over under
    up down to with without about above below between through during before after again
    further once i me my mine we us our ours you your yours he him his she her hers it its they
    them their theirs is am are was were be been being have has had having do does did doing
    done will would shall should can could may might must s t d ll m re ve don doesn didn isn
    aren wasn weren won hasn haven hadn couldn shouldn wouldn one yes ok well
    document documents text passage context according states stated mentions mentioned say says
    said provided given type kind sort called named"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_CONTENT = re.compile(r"\d[\d,]*(?:\.\d+)?|[a-z]+")


def _stem(word: str) -> str:
    """Crude suffix stripping so "employees" is grounded by "employee" and "founded" by
    "founding"; enough for a grounding test, not a linguistic stemmer."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    """Lowercase alphabetic tokens outside STOPWORDS, and numbers (thousands commas dropped)."""
    out = []
    for tok in _CONTENT.findall(text.lower()):
        if tok[0].isdigit():
            out.append(tok.replace(",", ""))
        elif tok not in STOPWORDS:
            out.append(tok)
    return out


def grounding_text(example: Example) -> str:
    """What a candidate may draw its content words from: documents (titles included), every
    turn of the conversation and the gold answer."""
    docs = " ".join(f"{d.get('title', '')} {d.get('text', '')}" for d in example.documents)
    dialog = " ".join(m["content"] for m in example.messages)
    return f"{docs} {dialog} {example.response}"


def ungrounded_words(example: Example, candidate: str) -> list[str]:
    """The candidate's content words (`content_words`) found in neither the documents nor the
    conversation nor the gold answer, in order of first appearance."""
    have = {_stem(w) for w in content_words(grounding_text(example))}
    out: list[str] = []
    for w in content_words(candidate):
        if _stem(w) not in have and w not in out:
            out.append(w)
    return out


def _grounding_verdict(
    example: Example, candidate: str, max_ungrounded: int, score: float = 0.0
) -> Verdict | None:
    """A rejection (keeping ``score``) when more than ``max_ungrounded`` content words are
    ungrounded, else None."""
    extra = ungrounded_words(example, candidate)
    if len(extra) <= max_ungrounded:
        return None
    shown = ", ".join(extra[:6]) + (", ..." if len(extra) > 6 else "")
    return Verdict(
        False,
        score,
        f"{len(extra)} content word(s) in neither documents, conversation nor gold: {shown}",
    )


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# A name: a capitalized word after the first, or a capitalized first word followed by another.
_NAME = re.compile(r"(?<=\s)[A-Z][\w'-]*|^[A-Z][\w'-]*(?=\s+[A-Z])")


def gold_key_values(gold: str) -> list[str]:
    """What a correct answer must contain (stemmed, lowercase): the gold answer's numbers and
    names, or all its content words when it has neither ("Blue and green.")."""
    names = [w.lower() for w in _NAME.findall(gold.strip()) if w.lower() not in STOPWORDS]
    key = _numbers(gold) + [_stem(w) for n in names for w in _CONTENT.findall(n)]
    return key or [_stem(w) for w in content_words(gold)]


def missing_key_values(candidate: str, gold: str) -> list[str]:
    """The gold's key values (`gold_key_values`) the candidate lacks, in gold order."""
    have = {_stem(w) for w in content_words(candidate)} | set(_numbers(candidate))
    return [k for k in dict.fromkeys(gold_key_values(gold)) if k not in have]


def compile_patterns(patterns: str, *, field: str = "judge.refusal_patterns") -> re.Pattern[str]:
    """A user's refusal regex (Python `re`, case-insensitive), or one clear error."""
    try:
        return re.compile(patterns, re.IGNORECASE)
    except re.error as e:
        raise InputError(f"not a valid regular expression: {e}", field=field) from None


# What the rule judge checks echoes of unless told (make_judge passes data.system_prompt).
DEFAULT_SYSTEM_PROMPT = Config().data.system_prompt


class RuleJudge:
    """Accept when candidate and gold agree on refusing, and an answer has token-F1 ≥ min_f1
    and contains every number of the gold answer (F1 alone accepts "founded in 1990" for
    "Founded in 1987."). ``refusal_patterns``: a regex that also marks a refusal, beside the
    built-in phrases (a dataset's own refusal wording). ``grounding``: an answer is also
    rejected when more than ``max_ungrounded`` of its content words (`content_words`) occur
    in neither the documents nor the conversation nor the gold answer ("Ravi Zainte is a
    fictional character from the movie 'The Mandalorian.'" for gold "Ravi Zainte."). Refusals
    are not grounding-checked: their wording ("the documents do not say") is not in the
    documents by nature."""

    def __init__(
        self,
        min_f1: float = 0.3,
        refusal_patterns: str = "",
        *,
        grounding: bool = False,
        max_ungrounded: int = 0,
        match: str = "f1",
        echo_of: Sequence[str] = (DEFAULT_SYSTEM_PROMPT,),
    ) -> None:
        self.min_f1, self.match = min_f1, match
        self.echo_of = tuple(t for t in echo_of if t.strip())  # see `echo_verdict`
        self.extra = compile_patterns(refusal_patterns) if refusal_patterns else None
        self.grounding, self.max_ungrounded = grounding, max_ungrounded
        extra = f",refusal+={_short_hash(refusal_patterns)}" if refusal_patterns else ""
        # off: the name (and so every verdict's resume key) is what it was before the check
        extra += f",grounded<={max_ungrounded}" if grounding else ""
        head = "contains" if match == "contains" else f"f1>={min_f1:g}"
        # the echo check is always on: verdicts from before it are not reused
        extra += f",no_echo={_short_hash(chr(10).join(self.echo_of))}"
        self.name = f"rule({head},numbers{extra})"

    def refuses(self, text: str) -> bool:
        return is_refusal(text) or bool(self.extra and self.extra.search(text))

    def gold_declines(self, example: Example) -> bool:
        if example.answerable is not None:
            return not example.answerable
        return self.refuses(example.response)

    def judge(self, example: Example, candidate: str) -> Verdict:
        if not candidate.strip():
            return Verdict(False, 0.0, "empty answer")
        if (echo := echo_verdict(example, candidate, self.echo_of)) is not None:
            return echo  # before the refusal check: the instruction reads as a refusal
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
        if self.grounding:
            ungrounded = _grounding_verdict(example, candidate, self.max_ungrounded, f1)
            if ungrounded is not None:
                return ungrounded
        if self.match == "contains":
            lacking = missing_key_values(candidate, example.response)
            if lacking:
                return Verdict(False, f1, f"misses the gold's {', '.join(lacking)}")
            return Verdict(True, f1, "contains the gold answer's key values")
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


# The paraphrase tier's request (`paraphrase_instruction`); the echo filter measures a
# candidate against its fixed words.
PARAPHRASE_INTRO = "A correct answer is:"
PARAPHRASE_ASK = "Answer the question yourself in your own words, consistent with that answer."


def paraphrase_instruction(question: str, gold: str) -> str:
    """The last user turn of the S3FT paraphrase prompt: the question, the gold answer, the ask."""
    return f'{question}\n\n{PARAPHRASE_INTRO} "{gold}"\n{PARAPHRASE_ASK}'


_ECHO_START = re.compile(r"^\W*(a |the )?correct answer (is|would be)\b", re.IGNORECASE)


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def echo_overlap(candidate: str, n: int = 3) -> float:
    """Share of the candidate's word n-grams (SQuAD-normalized) that occur in the paraphrase
    request's own instruction words (the gold answer and the question not counted: a good
    paraphrase shares those)."""
    cand = _ngrams(_normalize_tokens(candidate), n)
    if not cand:
        return 0.0
    inst = _ngrams(_normalize_tokens(f"{PARAPHRASE_INTRO} {PARAPHRASE_ASK}"), n)
    return len(cand & inst) / len(cand)


# An echo repeats at least this share of one instruction sentence's word trigrams.
ECHO_SHARE = 0.8


def _sentences(text: str) -> list[list[str]]:
    """SQuAD-normalized words of each sentence (split at . ! ? ; : and line breaks)."""
    return [w for part in re.split(r"[.!?;:\n]+", text) if (w := _normalize_tokens(part))]


def instruction_echo(candidate: str, instruction: str, n: int = 3, *, gold: str = "") -> float:
    """The largest share of one instruction sentence's word n-grams that the candidate repeats
    (sentences of more than n words; SQuAD-normalized). A refusal in its own words shares a
    few n-grams with "If the documents do not contain the answer, say so." ("The documents do
    not contain the answer.": 3 of its 6); repeating the sentence shares them all. A sentence
    the ``gold`` answer repeats as much (ECHO_SHARE) is not counted: the gold may say it."""
    cand = _ngrams(_normalize_tokens(candidate), n)
    ref = _ngrams(_normalize_tokens(gold), n)
    shares = [
        len(grams & cand) / len(grams)
        for words in _sentences(instruction)
        if len(words) > n
        and (grams := _ngrams(words, n))
        and len(grams & ref) / len(grams) < ECHO_SHARE
    ]
    return max(shares, default=0.0)


def echo_verdict(example: Example, candidate: str, texts: Sequence[str] = ()) -> Verdict | None:
    """A rejection when the candidate repeats an instruction the model was given (at least
    ECHO_SHARE of one of its sentences, `instruction_echo`): ``texts`` (data.system_prompt),
    the record's own system message and the paraphrase request's instruction. A base model
    continuing its prompt echoes it, and "If the documents do not contain the answer, say so."
    would pass as a refusal. Else None."""
    own = [m["content"] for m in example.messages[:1] if m["role"] == "system"]
    for text in (*texts, *own, f"{PARAPHRASE_INTRO} {PARAPHRASE_ASK}"):
        share = instruction_echo(candidate, text, gold=example.response)
        if share >= ECHO_SHARE:
            return Verdict(False, 0.0, f"echoes the instruction: {share:.0%} of a sentence")
    return None


class ParaphraseFilter:
    """The paraphrase tier's judge: rejects echoes of the request (a candidate that starts
    "A correct answer is", or whose word trigrams are at least ``max_echo`` the request's
    instruction words) and answers with more than ``max_ungrounded`` ungrounded content words
    (`ungrounded_words`; refusals exempt, as in the rule judge), then asks ``inner``."""

    def __init__(self, inner: Judge, max_echo: float = 0.5, max_ungrounded: int = 0) -> None:
        self.inner, self.max_echo, self.max_ungrounded = inner, max_echo, max_ungrounded
        self.name = f"{inner.name}+paraphrase_filter(echo<{max_echo:g},grounded<={max_ungrounded})"

    def _reject(self, example: Example, candidate: str) -> Verdict | None:
        if _ECHO_START.search(candidate):
            return Verdict(
                False, 0.0, "echoes the paraphrase request: starts 'A correct answer is'"
            )
        overlap = echo_overlap(candidate)
        if overlap >= self.max_echo:
            return Verdict(
                False, 0.0, f"echoes the paraphrase request: {overlap:.0%} of its trigrams"
            )
        if is_refusal(candidate):
            return None
        return _grounding_verdict(example, candidate, self.max_ungrounded)

    def judge(self, example: Example, candidate: str) -> Verdict:
        return self.judge_batch([example], [candidate])[0]

    def judge_batch(self, examples: Sequence[Example], candidates: Sequence[str]) -> list[Verdict]:
        early = [self._reject(e, c) for e, c in zip(examples, candidates)]
        todo = [i for i, v in enumerate(early) if v is None]
        # only the candidates that pass the filters reach the (maybe costly) inner judge
        inner = self.inner.judge_batch([examples[i] for i in todo], [candidates[i] for i in todo])
        out: list[Verdict | None] = list(early)
        for i, v in zip(todo, inner):
            out[i] = v
        return [v for v in out if v is not None]


def paraphrase_judge(cfg: Config, judge: Judge) -> Judge:
    """The judge of the paraphrase tier: ``judge`` behind `ParaphraseFilter` unless
    judge.paraphrase_filter is off."""
    j = cfg.judge
    if not j.paraphrase_filter:
        return judge
    return ParaphraseFilter(judge, j.paraphrase_max_echo, j.max_ungrounded)


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
        return RuleJudge(
            j.min_f1,
            j.refusal_patterns,
            grounding=j.grounding,
            max_ungrounded=j.max_ungrounded,
            match=j.match,
            echo_of=(cfg.data.system_prompt,),
        )
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
