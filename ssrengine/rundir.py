"""The run directory: where each artifact lives and the typed rows of its files.

    config.json              the resolved config (model/data/mode are pinned for the run)
    generations.jsonl        GenerationRow per (example, model, inputs)   generate stage
    verdicts.jsonl           VerdictRow per (example, judge, inputs)      judge stage
    paraphrases.jsonl        GenerationRow (S3FT paraphrases of gold)     judge stage
    paraphrase_verdicts.jsonl VerdictRow of the paraphrases               judge stage
    rehearsal.jsonl          RehearsalRow per example                     build stage
    build_stats.json         BuildStats                                   build stage
    metrics.jsonl            MetricRow per optimizer step                 train stage
    checkpoints/step-N/      see ssrengine.checkpoint                     train stage
    provenance.json          Provenance per stage: what its output was made from
    eval/                    see `EvalDir`                                eval
    export/FORMAT/           the rehearsal set for another trainer        export

Every row is a frozen dataclass with ``to_json()`` and ``from_json(obj, file, line)``: a row
read back that is not an object, lacks a field or has one of the wrong type is an InputError
naming the file, line and field. Resumable rows carry a ``key()``: it covers everything the row
depends on, so a changed input gives a new key and the row is recomputed, never reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ssrengine.errors import InputError
from ssrengine.io import atomic_write_text, read_json, read_rows

CONFIG = "config.json"
GENERATIONS = "generations.jsonl"
VERDICTS = "verdicts.jsonl"
PARAPHRASES = "paraphrases.jsonl"
PARAPHRASE_VERDICTS = "paraphrase_verdicts.jsonl"
PREFIXES = "prefixes.jsonl"
PREFIX_VERDICTS = "prefix_verdicts.jsonl"
REHEARSAL = "rehearsal.jsonl"
BUILD_STATS = "build_stats.json"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
EXPORT = "export"


@dataclass(frozen=True)
class EvalDir:
    """OUT/eval/ of `python -m ssrengine eval` (OUT is the run dir unless --out says otherwise)."""

    root: Path

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def self_vs_gold(self) -> Path:
        return self.root / "self_vs_gold.json"

    @property
    def probe_base(self) -> Path:
        """The base model's greedy probe answers (GenerationRow): the drift reference."""
        return self.root / "probe_base.jsonl"

    @property
    def probe(self) -> Path:
        return self.root / "probe.jsonl"

    @property
    def probe_details(self) -> Path:
        return self.root / "probe_details.jsonl"

    @property
    def mc_details(self) -> Path:
        """Per-item multiple-choice results (MCDetail): the report pairs runs on them."""
        return self.root / "mc_details.jsonl"

    def split(self, name: str) -> Path:
        """A split's generations (GenerationRow)."""
        return self.root / f"{name}.jsonl"

    def split_details(self, name: str) -> Path:
        """A split's per-example scores (EvalDetail)."""
        return self.root / f"{name}_details.jsonl"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def generations(self) -> Path:
        return self.root / GENERATIONS

    @property
    def verdicts(self) -> Path:
        return self.root / VERDICTS

    @property
    def paraphrases(self) -> Path:
        return self.root / PARAPHRASES

    @property
    def paraphrase_verdicts(self) -> Path:
        return self.root / PARAPHRASE_VERDICTS

    @property
    def prefixes(self) -> Path:
        """Gold-decision-prefix tier: the base model's continuations (GenerationRow)."""
        return self.root / PREFIXES

    @property
    def prefix_verdicts(self) -> Path:
        return self.root / PREFIX_VERDICTS

    @property
    def rehearsal(self) -> Path:
        return self.root / REHEARSAL

    @property
    def build_stats(self) -> Path:
        return self.root / BUILD_STATS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.root / EVAL)

    def export(self, fmt: str) -> Path:
        return self.root / EXPORT / fmt


def content_hash(obj: Any) -> str:
    """A short stable hash of JSON-able ``obj``: the part of a resume key that covers inputs."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ shape checking
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field annotation (str, bool, int, float, X | None, list[X],
    dict[str, X], Any). JSON has no int/bool distinction we want: true is not a number."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(v, item) for v in value.values())
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _object(obj: Any, file: str, line: int | None, at: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(
            f"expected a JSON object, got {type(obj).__name__}",
            file=file,
            line=line,
            field=at.rstrip(".") or None,
        )
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


R = TypeVar("R", bound="Row")


class Row:
    """JSON <-> frozen dataclass whose field names are the JSON keys; ``from_json`` checks shape.

    Fields with a default may be absent from the JSON; ``None``-valued optional fields are left
    out of ``to_json`` so rows read the same as before they were typed."""

    _OMIT_NONE: tuple[str, ...] = ()

    @classmethod
    def from_json(cls: type[R], obj: Any, file: str, line: int | None = None, *, at: str = "") -> R:
        """``at`` prefixes field names in errors when the row is nested in another."""
        obj = _object(obj, file, line, at)
        hints, values = _hints(cls), {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name, tp = f.name, hints[f.name]
            if name not in obj:
                if f.default is not dataclasses.MISSING:
                    continue
                raise InputError("missing", file=file, line=line, field=at + name)
            v = obj[name]
            if isinstance(tp, type) and issubclass(tp, Row):
                values[name] = tp.from_json(v, file, line, at=f"{at}{name}.")
                continue
            if typing.get_origin(tp) is list and _is_row(typing.get_args(tp)[0]):
                item = typing.get_args(tp)[0]
                if not isinstance(v, list):
                    raise InputError("expected a list", file=file, line=line, field=at + name)
                values[name] = [
                    item.from_json(x, file, line, at=f"{at}{name}[{i}].") for i, x in enumerate(v)
                ]
                continue
            if typing.get_origin(tp) is dict and _is_row(typing.get_args(tp)[1]):
                item = typing.get_args(tp)[1]
                if not isinstance(v, dict):
                    raise InputError("expected an object", file=file, line=line, field=at + name)
                values[name] = {
                    k: item.from_json(x, file, line, at=f"{at}{name}.{k}.") for k, x in v.items()
                }
                continue
            if not _matches(v, tp):
                raise InputError(
                    f"expected {_type_name(tp)}, got {type(v).__name__} {v!r:.40}",
                    file=file,
                    line=line,
                    field=at + name,
                )
            values[name] = v
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name in self._OMIT_NONE and v is None:
                continue
            if isinstance(v, Row):
                v = v.to_json()
            elif isinstance(v, list) and v and all(isinstance(x, Row) for x in v):
                v = [x.to_json() for x in v]
            elif isinstance(v, dict) and v and all(isinstance(x, Row) for x in v.values()):
                v = {k: x.to_json() for k, x in v.items()}
            out[f.name] = v
        return out


def _is_row(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Row)


def read_typed(path: Path, cls: type[R]) -> Iterator[R]:
    """Rows of a run-dir JSONL file as ``cls``, in order (a torn last line is ignored).

    Line numbers count the rows: exact for files the engine wrote (no blank lines)."""
    for lineno, obj in enumerate(read_rows(path), 1):
        try:
            yield cls.from_json(obj, str(path), lineno)
        except InputError as e:
            # A file from another version of the engine, or edited by hand: the stage that
            # writes it recomputes what it needs.
            raise InputError(
                f"{e.message}; delete the file to redo its stage",
                file=e.file,
                line=e.line,
                field=e.field,
            ) from None


# -------------------------------------------------------------------------- stage rows
def generation_key(example_id: str, model: str, prompt_hash: str, sample: int | None = None) -> str:
    """``sample``: the index of one of generation.num_samples answers; sample 0 (or None) keeps
    the key of a single answer, so the first sample of k is reused from a k = 1 run."""
    key = f"{example_id}|{model}|{prompt_hash}"
    return f"{key}|s{sample}" if sample else key


@dataclass(frozen=True)
class GenerationRow(Row):
    """One answer of a model. ``prompt_hash`` covers the prompt messages, the sampling
    parameters, the backend and the dtype: everything the answer depends on besides the model.
    ``sample``: which of generation.num_samples answers (absent for sample 0)."""

    _OMIT_NONE = ("sample",)

    id: str
    response: str
    token_ids: list[int]
    finish_reason: str
    backend: str
    model: str
    prompt_hash: str
    sample: int | None = None

    def key(self) -> str:
        return generation_key(self.id, self.model, self.prompt_hash, self.sample)


def verdict_key(example_id: str, judge: str, input_hash: str) -> str:
    return f"{example_id}|{judge}|{input_hash}"


@dataclass(frozen=True)
class VerdictRow(Row):
    """A judge's verdict. ``judge`` names the judge and its settings; ``input_hash`` covers the
    example (documents, conversation, gold answer, answerable label) and the candidate."""

    id: str
    accept: bool
    score: float
    reason: str
    judge: str
    input_hash: str

    def key(self) -> str:
        return verdict_key(self.id, self.judge, self.input_hash)


SOURCES = ("self", "paraphrase", "prefix", "gold")


@dataclass(frozen=True)
class RehearsalRow(Row):
    """A training example: the prompt and the target the model is fine-tuned on.
    ``source`` is one of SOURCES (R = the model's own accepted answer, paraphrase, the base
    model's completion of the gold decision, G = gold)."""

    id: str
    messages: list[dict[str, str]]
    documents: list[dict[str, str]]
    target: str
    source: str
    answerable: bool | None = None

    @classmethod
    def of(cls, example: Any, target: str | None = None, source: str = "gold") -> RehearsalRow:
        """``example``'s (an `ssrengine.data.Example`) prompt with ``target`` from ``source``;
        by default its gold answer."""
        return cls(
            id=example.id,
            messages=example.messages,
            documents=example.documents,
            target=example.response if target is None else target,
            source=source,
            answerable=example.answerable,
        )

    @classmethod
    def from_json(cls, obj: Any, file: str, line: int | None = None) -> RehearsalRow:
        row = super().from_json(obj, file, line)
        if row.source not in SOURCES:
            raise InputError(
                f"expected one of {', '.join(SOURCES)}, got {row.source!r}",
                file=file,
                line=line,
                field="source",
            )
        return row


@dataclass(frozen=True)
class SourceCounts:
    """How many targets of a subset come from each source; R share = own answers / n."""

    n: int
    own: int  # "self" in JSON
    paraphrase: int
    gold: int
    prefix: int = 0

    @property
    def r_share(self) -> float:
        return round(self.own / self.n, 4) if self.n else 0.0

    @classmethod
    def of(cls, rows: list[RehearsalRow]) -> SourceCounts:
        count = {s: sum(r.source == s for r in rows) for s in SOURCES}
        return cls(len(rows), count["self"], count["paraphrase"], count["gold"], count["prefix"])

    def count(self, source: str) -> int:
        """Targets from ``source``, one of SOURCES."""
        return {
            "self": self.own,
            "paraphrase": self.paraphrase,
            "prefix": self.prefix,
            "gold": self.gold,
        }[source]

    def share(self, source: str) -> float:
        return self.count(source) / max(self.n, 1)

    def to_json(self) -> dict[str, Any]:
        # "prefix" only where that tier ran: build stats of other runs keep their keys
        counts = {s: self.count(s) for s in SOURCES if s != "prefix" or self.prefix}
        return {"n": self.n, **counts, "R_share": self.r_share}

    @classmethod
    def from_json(cls, obj: Any, file: str, field: str) -> SourceCounts:
        if not isinstance(obj, dict):
            raise InputError("expected an object", file=file, field=field)
        got = {"prefix": 0}  # absent in build stats written before the prefix tier
        for k in ("n", *SOURCES):
            if k == "prefix" and k not in obj:
                continue
            v = obj.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"expected a count, got {v!r}", file=file, field=f"{field}.{k}")
            got[k] = v
        return cls(got["n"], got["self"], got["paraphrase"], got["gold"], got["prefix"])


BUILD_SUBSETS = ("overall", "answerable", "unanswerable")


@dataclass(frozen=True)
class BuildStats:
    """Source counts of the rehearsal set: all examples and by answerable label."""

    overall: SourceCounts
    answerable: SourceCounts
    unanswerable: SourceCounts

    @classmethod
    def of(cls, rows: list[RehearsalRow]) -> BuildStats:
        return cls(
            SourceCounts.of(rows),
            SourceCounts.of([r for r in rows if r.answerable is True]),
            SourceCounts.of([r for r in rows if r.answerable is False]),
        )

    def subsets(self) -> dict[str, SourceCounts]:
        return {
            "overall": self.overall,
            "answerable": self.answerable,
            "unanswerable": self.unanswerable,
        }

    def to_json(self) -> dict[str, Any]:
        return {k: v.to_json() for k, v in self.subsets().items()}

    @classmethod
    def from_json(cls, obj: Any, file: str) -> BuildStats:
        obj = _object(obj, file, None)
        return cls(*(SourceCounts.from_json(obj.get(k), file, k) for k in BUILD_SUBSETS))

    @classmethod
    def read(cls, path: Path) -> BuildStats:
        return cls.from_json(read_json(path), str(path))

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


@dataclass(frozen=True)
class MetricRow(Row):
    """One optimizer step of training (metrics.jsonl)."""

    step: int
    loss: float
    lr: float = 0.0
    supervised_tokens: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    grad_norm: float = 0.0
    step_time_s: float = 0.0
    epoch: int = 0
    world_size: int = 1
    mfu: float | None = None  # model FLOPs utilization (ssrengine.flops); None: CPU, unknown GPU
    eval_loss: float | None = None  # validation loss, at the steps train.eval_every names

    _OMIT_NONE = ("eval_loss",)


# -------------------------------------------------------------------------- provenance
STAGES = ("generate", "judge", "build", "train")

# The config keys (a section or section.field) each stage's own work depends on. Keys that
# change only how the work is done (batch sizes of generate and judge, URLs, concurrency,
# checkpoint cadence, the parallel layout, recomputing activations, the cross-entropy
# implementation) are left out: changing them changes no output beyond float rounding.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "generate": (
        "model",
        "data",
        "generation.backend",
        "generation.model",
        "generation.max_new_tokens",
        "generation.temperature",
        "generation.top_p",
        "generation.num_samples",
        "train.seed",
    ),
    "judge": (
        "judge.kind",
        "judge.threshold",
        "judge.min_f1",
        "judge.rubric",
        "judge.refusal_patterns",
        "judge.grounding",
        "judge.max_ungrounded",
        "judge.paraphrase_filter",
        "judge.paraphrase_max_echo",
        "judge.model",
        "judge.backend",
        "judge.paraphrase",
        "judge.prefix",
    ),
    "build": ("run.mode", "judge.gold_answerable_share"),
    "train": ("train",),
}
_OPERATIONAL = (
    "train.save_every",
    "train.keep_checkpoints",
    "train.parallel",
    "train.gradient_checkpointing",
    "train.loss_impl",
    # Validation and trackers watch training without changing it.
    "data.eval_file",
    "data.eval_split",
    "train.eval_every",
    "train.keep_best",
    "train.report_to",
    "train.loss_grad_filter",
)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"judge": {"min_f1": 0.3}}`` → ``{"judge.min_f1": 0.3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def stage_config(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The flattened config values the output of ``stage`` depends on, its upstream stages'
    included (run.mode = sft trains on gold answers: no generation or judge settings)."""
    flat = flat_config(config)
    upto = STAGES[: STAGES.index(stage) + 1]
    if flat.get("run.mode") == "sft":
        upto = tuple(s for s in upto if s not in ("generate", "judge"))
    keys = [k for s in upto for k in STAGE_KEYS[s]] + (
        ["model", "data"] if "generate" not in upto else []
    )
    return {
        k: v
        for k, v in sorted(flat.items())
        if any(k == p or k.startswith(p + ".") for p in keys) and k not in _OPERATIONAL
    }


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every flattened key of both whose value differs. A key of one
    side only is a config field another ssrengine version added or removed (or a key it no
    longer counts in `STAGE_KEYS`): not a change the user made, so it never refuses a run."""
    return [
        f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k]
    ]


@dataclass(frozen=True)
class Provenance(Row):
    """What one stage's output was made from: ``config``, the flattened config values it
    depends on (`stage_config`), and ``inputs``, a content hash of the rows it read.
    ``output`` hashes the rows it wrote (empty for train: the checkpoints are its output)."""

    stage: str
    config: dict[str, Any]
    inputs: str
    output: str = ""


def read_provenance(rd: RunDir) -> dict[str, Provenance]:
    """Every stage's record by stage name ({} for a run dir without one)."""
    if not rd.provenance.exists():
        return {}
    obj = _object(read_json(rd.provenance), str(rd.provenance), None)
    return {k: Provenance.from_json(v, str(rd.provenance), at=f"{k}.") for k, v in obj.items()}


def write_provenance(rd: RunDir, record: Provenance) -> None:
    records = read_provenance(rd) | {record.stage: record}
    text = json.dumps({k: v.to_json() for k, v in records.items()}, indent=2) + "\n"
    atomic_write_text(rd.provenance, text)


# --------------------------------------------------------------------------- eval rows
@dataclass(frozen=True)
class EvalDetail(Row):
    """One example of an eval split: gold class, whether the answer declined, and for
    answerable questions the answer's token recall/F1 (0 when it declined).
    ``refusal_logprob``: log p(the refusal | prompt) under the model (the decision probe)."""

    _OMIT_NONE = ("recall", "f1", "refusal_logprob")

    id: str
    unanswerable: bool
    declined: bool
    recall: float | None = None
    f1: float | None = None
    refusal_logprob: float | None = None


@dataclass(frozen=True)
class ProbeDetail(Row):
    """One retention probe prompt: the evaluated model's answer, the base model's, whether the
    answer is correct, and the base answer's log-probability per token under the model."""

    id: str
    category: str
    answer: str
    base_answer: str
    correct: bool
    logprob_base_answer: float


@dataclass(frozen=True)
class MCDetail(Row):
    """One multiple-choice item: whether the model's argmax choice is the answer."""

    id: str
    correct: bool


@dataclass(frozen=True)
class SelfVsGoldRow(Row):
    """Paper Figure 1, one training example: mean log-probability per token of the gold
    answer and of the model's own answer under the base model."""

    id: str
    unanswerable: bool
    accept: bool | None
    gold_logprob: float
    own_logprob: float
    gold_tokens: int = 0
    own_tokens: int = 0


@dataclass(frozen=True)
class SelfVsGold(Row):
    """OUT/eval/self_vs_gold.json: Figure 1 rows scored under the base model ``model``."""

    model: str
    unit: str
    rows: list[SelfVsGoldRow]


@dataclass(frozen=True)
class Confusion(Row):
    """Answerable/unanswerable confusion matrix: ``matrix[gold class][behaviour]``."""

    rows: list[str]
    cols: list[str]
    matrix: list[list[int]]


@dataclass(frozen=True)
class UnanswerablePRF(Row):
    """Detecting unanswerable questions by declining (positive class = unanswerable)."""

    precision: float
    recall: float
    f1: float
    accuracy: float
    support: int


@dataclass(frozen=True)
class SplitMetrics(Row):
    """Task metrics of one eval split; ``score`` = mean of unanswerable F1 and answer recall, in
    points. ``data`` is the split's data spec (empty until the split is named in eval.json).
    ``paper``: the paper's metrics, each ``{value, lo, hi}`` with its 95% bootstrap interval
    (`ssrengine.metrics.paper_metrics`); absent in evals made before it existed."""

    _OMIT_NONE = ("paper",)

    n: int
    n_answerable: int
    confusion: Confusion
    unanswerable: UnanswerablePRF
    answer_recall: float
    answer_f1: float
    score: float
    data: str = ""
    paper: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        data = out.pop("data")
        return {"data": data, **out} if data else out


@dataclass(frozen=True)
class EvalResult(Row):
    """OUT/eval/eval.json. ``retention`` is ssrengine.retention's nested result;
    ``retention_metrics`` its flat "higher is better" numbers the report compares."""

    name: str
    kind: str
    mode: str
    model: str
    base: str
    run_dir: str | None
    splits: dict[str, SplitMetrics]
    retention: dict[str, Any]
    retention_metrics: dict[str, float]
    self_vs_gold: bool
    options: dict[str, Any]
    config: dict[str, Any]
    wall_s: float

    @classmethod
    def read(cls, path: Path) -> EvalResult:
        return cls.from_json(read_json(path), str(path))
