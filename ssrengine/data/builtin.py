"""The embedded default dataset: seeded content-grounded QA in the SSR paper's task shape.

Each example is 1–3 short documents about invented entities, then a question (single-turn, or a
follow-up after 1–2 earlier turns that may use "it" or "What about X?"). About 30% ask for an
attribute the documents do not state, about an entity that is present: the gold answer is then
`GOLD_REFUSAL`. Gold answers follow a fixed annotator style that a chat model does not use:
one terse declarative phrase copied from the document ("Founded in 1987.", "Mara Quill.").
That gap between the gold style and the model's own style is what SSR is about.

Splits: train / validation / test share a domain (companies and products) with disjoint
entities; ood is another domain (towns and rivers) with the same question mix. Every invented
word goes to exactly one split by its CRC-32, so no name crosses splits whatever the seed.
Pure Python and seeded per split: the same (split, seed) gives the same records everywhere.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssrengine.core.cache import cache_dir
from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_jsonl

GENERATOR_VERSION = 1  # bump when the output changes: it names the cache directory
GOLD_REFUSAL = "The documents do not say."
SPLITS = ("train", "validation", "test", "ood")
SIZES = {"train": 400, "validation": 100, "test": 200, "ood": 200}
UNANSWERABLE_SHARE = 0.3
MULTI_TURN_SHARE = 0.4
# CRC-32 of an invented word mod 10 -> the split allowed to use it.
_BUCKETS = {"train": (0, 1, 2, 3, 4, 5), "validation": (6,), "test": (7, 8), "ood": (9,)}

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pr", "r")
_ONSETS += ("s", "st", "t", "tr", "v", "w", "z", "th", "sh", "")
_SOFT_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "p", "t", "v", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd")
_FINALS = ("", "n", "r", "l", "s", "ra", "na", "lo", "ton", "mere", "wick", "dale", "ford", "vin")
# fmt: off
_FIRST_NAMES = (
    "Mara", "Ilse", "Tomas", "Nadia", "Owen", "Priya", "Joel", "Greta", "Hugo", "Lena", "Ravi",
    "Sofia", "Anton", "Yara", "Felix", "Ines", "Kofi", "Clara", "Milo", "Zora", "Emil", "Ada",
    "Luca", "Rosa", "Ivo", "Nell", "Bram", "Talia", "Otto", "Wren",
)
# fmt: on


class _Names:
    """Invented words for one split: CRC-bucketed (split-disjoint) and never reused."""

    def __init__(self, rng: random.Random, split: str) -> None:
        self.rng, self.buckets, self.used = rng, _BUCKETS[split], set[str]()

    def word(self) -> str:
        r = self.rng
        while True:
            coda = r.choice(_CODAS)
            onset = r.choice(_ONSETS[:-1] if not coda else _SOFT_ONSETS)  # no "rkk"-like knots
            w = r.choice(_ONSETS) + r.choice(_VOWELS) + coda + onset
            w += r.choice(_VOWELS) + r.choice(_FINALS)
            if not 4 <= len(w) <= 10 or w in self.used:
                continue
            if zlib.crc32(w.encode()) % 10 in self.buckets:
                self.used.add(w)
                return w.capitalize()

    def person(self) -> str:
        return f"{self.rng.choice(_FIRST_NAMES)} {self.word()}"

    def pick(self, options: tuple[str, ...]) -> str:
        return self.rng.choice(options)

    def num(self, lo: int, hi: int, step: int = 1) -> str:
        return f"{self.rng.randrange(lo, hi, step):,}"

    def year(self, lo: int, hi: int) -> str:
        return str(self.rng.randrange(lo, hi))


@dataclass(frozen=True)
class Attr:
    """One fact an entity can have: how a document states it, asks it, and annotators answer.

    Templates: {S} subject ("It" or the name), {Its} possessive, {v} value, {a} its article;
    questions use {e} (name or "it") and {its} (name's or "its") so every one reads with a
    pronoun too."""

    name: str
    value: Callable[[_Names], str]
    says: str
    asks: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Kind:
    name: str
    entity: Callable[[_Names], tuple[str, str]]  # -> (title, reference in running text)
    intro: Attr  # always stated, as the first sentence
    attrs: tuple[Attr, ...]


_INDUSTRIES = ("robotics", "furniture", "bicycle", "textile", "battery", "ceramics", "coffee")
_INDUSTRIES += ("software", "shipping", "toy", "paint", "drone", "telescope", "kitchenware")
_PRODUCT_TYPES = ("desk lamp", "water filter", "sketch tablet", "rice cooker", "smart lock")
_PRODUCT_TYPES += ("camping stove", "label printer", "air purifier", "bike helmet")
_CATEGORIES = ("pocket translator", "electric kettle", "folding bicycle", "smart thermostat")
_CATEGORIES += ("handheld game console", "robot vacuum", "garden sprinkler", "e-reader")
_CATEGORIES += ("espresso machine", "wireless headset", "hand drill", "weather station")
_PRIZE_FIELDS = ("Design", "Innovation", "Safety", "Export", "Craft", "Engineering")
_COLOURS = ("matte black", "sea green", "bright orange", "slate grey", "cream white", "navy blue")
_KNOWN_FOR = ("glass blowing", "lace making", "its salt marshes", "a spring horse fair")
_KNOWN_FOR += ("copper mining", "an old stone bridge", "its cheese market", "boat building")
_KNOWN_FOR += ("a lantern festival", "its hot springs", "a clock tower")
_TOWN_TRADES = ("fishing", "tourism", "wool weaving", "timber", "salt panning", "pottery")
_TOWN_TRADES += ("fruit farming", "quarrying")
_FISH = ("silver grayling", "spotted loach", "river lamprey", "golden carp", "striped perch")
_FISH += ("brown trout", "freshwater eel", "bleak")

# fmt: off
COMPANY = Kind(
    "company",
    lambda n: (t := f"{n.word()} {n.pick(('Labs', 'Works', 'Systems', 'Industries', 'Group'))}", t),
    Attr("industry", lambda n: n.pick(_INDUSTRIES), "{S} is {a} {v} company.",
         ("What kind of company is {e}?", "What industry is {e} in?"), "{a} {v} company."),
    (
        Attr("founded", lambda n: n.year(1890, 2016), "{S} was founded in {v}.",
             ("When was {e} founded?", "In what year was {e} founded?"), "Founded in {v}."),
        Attr("founder", lambda n: n.person(), "{Its} founder is {v}.",
             ("Who founded {e}?", "Who is {its} founder?"), "{v}."),
        Attr("headquarters", lambda n: n.word(), "{Its} headquarters are in {v}.",
             ("Where is {e} headquartered?", "Where are {its} headquarters?"), "In {v}."),
        Attr("employees", lambda n: n.num(12, 4000), "{S} has {v} employees.",
             ("How many employees does {e} have?", "How big is {its} workforce?"),
             "{v} employees."),
        Attr("ceo", lambda n: n.person(), "{Its} chief executive is {v}.",
             ("Who is {its} chief executive?", "Who runs {e}?"), "{v}."),
        Attr("product", lambda n: f"{n.word()} {n.pick(_PRODUCT_TYPES)}",
             "{Its} best-known product is the {v}.",
             ("What is {its} best-known product?", "What is {e} best known for making?"),
             "The {v}."),
        Attr("award", lambda n: f"{n.word()} Prize for {n.pick(_PRIZE_FIELDS)}",
             "{S} won the {v}.", ("What award did {e} win?", "Which prize has {e} won?"),
             "The {v}."),
    ),
)
# fmt: on

# fmt: off
PRODUCT = Kind(
    "product",
    lambda n: (t := f"{n.word()} {n.pick(('', '2', '3', 'X', 'Mini', 'Pro'))}".strip(), f"the {t}"),
    Attr("category", lambda n: n.pick(_CATEGORIES), "{S} is {a} {v}.",
         ("What kind of product is {e}?", "What exactly is {e}?"), "{a} {v}."),
    (
        Attr("maker", lambda n: f"{n.word()} {n.pick(('Labs', 'Works', 'Systems'))}",
             "{S} is made by {v}.", ("Who makes {e}?", "Which company makes {e}?"), "{v}."),
        Attr("released", lambda n: n.year(1990, 2024), "{S} was released in {v}.",
             ("When was {e} released?", "In what year did {e} come out?"), "Released in {v}."),
        Attr("price", lambda n: n.num(19, 2500), "{S} costs {v} dollars.",
             ("How much does {e} cost?", "What is {its} price?"), "{v} dollars."),
        Attr("weight", lambda n: n.num(80, 9000, 10), "{S} weighs {v} grams.",
             ("How much does {e} weigh?", "What is {its} weight?"), "{v} grams."),
        Attr("designer", lambda n: n.person(), "{S} was designed by {v}.",
             ("Who designed {e}?", "Who is {its} designer?"), "{v}."),
        Attr("warranty", lambda n: n.num(1, 11), "{S} comes with a {v}-year warranty.",
             ("How long is {its} warranty?", "What warranty does {e} come with?"),
             "A {v}-year warranty."),
        Attr("colour", lambda n: n.pick(_COLOURS), "{S} comes in {v}.",
             ("What colour does {e} come in?", "What colour is {e} sold in?"), "{v}."),
    ),
)
# fmt: on

# fmt: off
TOWN = Kind(
    "town",
    lambda n: (t := n.word(), t),
    Attr("province", lambda n: n.word(), "{S} is a town in {v} Province.",
         ("Which province is {e} in?", "In which province does {e} lie?"), "{v} Province."),
    (
        Attr("settled", lambda n: n.year(1100, 1900), "{S} was settled in {v}.",
             ("When was {e} settled?", "In what year was {e} first settled?"), "Settled in {v}."),
        Attr("population", lambda n: n.num(800, 60000, 100), "{S} has {v} residents.",
             ("How many residents does {e} have?", "What is {its} population?"),
             "{v} residents."),
        Attr("mayor", lambda n: n.person(), "{Its} mayor is {v}.",
             ("Who is {its} mayor?", "Who leads {e} as mayor?"), "{v}."),
        Attr("known_for", lambda n: n.pick(_KNOWN_FOR), "{S} is known for {v}.",
             ("What is {e} known for?", "What is {e} famous for?"), "{v}."),
        Attr("river", lambda n: n.word(), "{S} lies on the {v} River.",
             ("Which river does {e} lie on?", "What river runs through {e}?"), "The {v} River."),
        Attr("elevation", lambda n: n.num(5, 2400, 5), "{S} sits {v} metres above sea level.",
             ("How high above sea level is {e}?", "What is {its} elevation?"), "{v} metres."),
        Attr("trade", lambda n: n.pick(_TOWN_TRADES), "{Its} main trade is {v}.",
             ("What is {its} main trade?", "Which trade is {e} built on?"), "{v}."),
    ),
)
# fmt: on

# fmt: off
RIVER = Kind(
    "river",
    lambda n: (t := f"{n.word()} River", f"the {t}"),
    Attr("province", lambda n: n.word(), "{S} is a river in {v} Province.",
         ("Which province is {e} in?", "In which province does {e} flow?"), "{v} Province."),
    (
        Attr("length", lambda n: n.num(40, 900), "{S} is {v} kilometres long.",
             ("How long is {e}?", "What is {its} length?"), "{v} kilometres."),
        Attr("source", lambda n: f"{n.word()} {n.pick(('Hills', 'Mountains', 'Moors'))}",
             "{S} rises in the {v}.", ("Where does {e} rise?", "Where is {its} source?"),
             "In the {v}."),
        Attr("mouth", lambda n: n.pick(("Lake {}", "the {} Sea", "the {} Bay")).format(n.word()),
             "{S} flows into {v}.", ("What does {e} flow into?", "Where does {e} end?"),
             "Into {v}."),
        Attr("tributary", lambda n: n.word(), "{Its} main tributary is the {v}.",
             ("What is {its} main tributary?", "Which river feeds {e}?"), "The {v}."),
        Attr("fish", lambda n: n.pick(_FISH), "{S} is home to the {v}.",
             ("Which fish is {e} home to?", "What fish lives in {e}?"), "The {v}."),
        Attr("bridges", lambda n: n.num(2, 40), "{S} is crossed by {v} bridges.",
             ("How many bridges cross {e}?", "How many bridges span {e}?"), "{v} bridges."),
    ),
)
# fmt: on

_IN_DOMAIN = (COMPANY, PRODUCT)
_DOMAINS = {"train": _IN_DOMAIN, "validation": _IN_DOMAIN, "test": _IN_DOMAIN, "ood": (TOWN, RIVER)}
_ELLIPSIS = ("What about {e}?", "And {e}?", "How about {e}?")


@dataclass(eq=False)  # compared by identity
class _Entity:
    kind: Kind
    title: str
    ref: str  # "Ostra Labs", "the Drova 3"
    facts: dict[str, str]  # every attribute of the kind, stated or not
    stated: list[Attr] = field(default_factory=list)  # intro first


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _poss(ref: str) -> str:
    return f"{ref}'" if ref.endswith("s") else f"{ref}'s"


def _article(v: str) -> str:
    return "an" if v[0].lower() in "aeiou" else "a"


def _entity(rng: random.Random, names: _Names, kind: Kind, n_facts: int) -> _Entity:
    title, ref = kind.entity(names)
    attrs = (kind.intro, *kind.attrs)
    e = _Entity(kind, title, ref, {a.name: a.value(names) for a in attrs})
    e.stated = [kind.intro, *rng.sample(kind.attrs, n_facts)]
    return e


def _document(rng: random.Random, e: _Entity) -> dict[str, str]:
    sents = []
    for i, a in enumerate(e.stated):
        pronoun = i > 0 and rng.random() < 0.6
        v = e.facts[a.name]
        sents.append(
            a.says.format(
                S="It" if pronoun else _cap(e.ref),
                Its="Its" if pronoun else _cap(_poss(e.ref)),
                v=v,
                a=_article(v),
            )
        )
    return {"title": e.title, "text": " ".join(sents)}


def _answer(e: _Entity, a: Attr) -> str:
    v = e.facts[a.name]
    return _cap(a.answer.format(v=v, a=_article(v)))


def _question(rng: random.Random, e: _Entity, a: Attr, mode: str) -> str:
    if mode == "ellipsis":
        return _cap(rng.choice(_ELLIPSIS).format(e=e.ref))
    e_ref, its = ("it", "its") if mode == "pronoun" else (e.ref, _poss(e.ref))
    return _cap(rng.choice(a.asks).format(e=e_ref, its=its))


Pair = tuple[_Entity, Attr]


def _previous_turn(
    rng: random.Random, ents: list[_Entity], cur: Pair, used: list[Pair]
) -> tuple[str, Pair]:
    """An earlier answerable turn and how `cur` refers back to it (pronoun / ellipsis / named)."""
    e, a = cur
    fresh = [(x, b) for x in ents for b in x.stated if (x, b) not in used]
    options = {
        "pronoun": [(x, b) for x, b in fresh if x is e and b is not a],
        "ellipsis": [(x, b) for x, b in fresh if x is not e and x.kind is e.kind and b is a],
        "named": [(x, b) for x, b in fresh if (x, b) != cur],
    }
    modes = [m for m in ("pronoun", "ellipsis", "named") if options[m]]
    weights = {"pronoun": 0.45, "ellipsis": 0.3, "named": 0.25}
    mode = rng.choices(modes, weights=[weights[m] for m in modes])[0]
    return mode, rng.choice(options[mode])


def _example(
    rng: random.Random, names: _Names, kinds: tuple[Kind, ...], answerable: bool, n_prev: int
) -> dict[str, Any]:
    n_docs = rng.choices((1, 2, 3), weights=(25, 40, 35))[0]
    same_kind = rng.random() < 0.5
    kind0 = rng.choice(kinds)
    ents = []
    for _ in range(n_docs):
        kind = kind0 if same_kind else rng.choice(kinds)
        n_facts = rng.choice((1, 2) if n_docs == 3 else (2, 3) if n_docs == 1 else (1, 2, 3))
        ents.append(_entity(rng, names, kind, n_facts))
    docs = [_document(rng, e) for e in ents]

    target = rng.choice(ents)
    pool = target.stated if answerable else [a for a in target.kind.attrs if a not in target.stated]
    pairs: list[Pair] = [(target, rng.choice(pool))]
    modes = []
    for _ in range(n_prev):
        mode, prev = _previous_turn(rng, ents, pairs[0], pairs)
        modes.insert(0, mode)
        pairs.insert(0, prev)
    modes.insert(0, "named")

    messages = []
    for i, ((e, a), mode) in enumerate(zip(pairs, modes)):
        messages.append({"role": "user", "content": _question(rng, e, a, mode)})
        if i < n_prev:
            messages.append({"role": "assistant", "content": _answer(e, a)})
    return {
        "documents": docs,
        "messages": messages,
        "response": _answer(*pairs[-1]) if answerable else GOLD_REFUSAL,
        "answerable": answerable,
    }


def generate(split: str, seed: int = 0, size: int | None = None) -> list[dict[str, Any]]:
    """The records of one split: deterministic in (split, seed); `size` overrides SIZES."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = SIZES[split] if size is None else size
    # A str seed goes through SHA-512 in random.seed: stable across runs, machines, hash seeds.
    rng = random.Random(f"ssrengine-cgqa-v{GENERATOR_VERSION}:{split}:{seed}")
    names = _Names(rng, split)
    unanswerable = set(rng.sample(range(n), round(n * UNANSWERABLE_SHARE)))
    multi_turn = set(rng.sample(range(n), round(n * MULTI_TURN_SHARE)))
    out = []
    for i in range(n):
        n_prev = rng.choice((1, 1, 2)) if i in multi_turn else 0
        ex = _example(rng, names, _DOMAINS[split], i not in unanswerable, n_prev)
        out.append({"id": f"cgqa-{split}-{i:05d}", **ex})
    return out


def materialize(split: str, seed: int = 0) -> Path:
    """Write the split once to ``cache_dir()/data/builtin-v{VERSION}-seed{seed}/{split}.jsonl``."""
    path = cache_dir() / "data" / f"builtin-v{GENERATOR_VERSION}-seed{seed}" / f"{split}.jsonl"
    if not path.exists():
        atomic_write_jsonl(path, generate(split, seed))
    return path


def resolve_data_file(spec: str, seed: int = 0) -> Path:
    """A path, or ``builtin:SPLIT`` → the embedded generator's split, written once to the cache."""
    if not spec.startswith("builtin:"):
        return Path(spec)
    split = spec.removeprefix("builtin:")
    if split not in SPLITS:
        raise InputError(
            f"unknown builtin split {split!r}; expected one of {', '.join(SPLITS)}",
            field="data.train_file",
        )
    return materialize(split, seed)
