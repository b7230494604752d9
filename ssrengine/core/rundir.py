"""The run directory: where each artifact lives and the typed rows of its files.

    config.json              the resolved config (model/data/mode are pinned for the run)
    generations.jsonl        GenerationRow per (example, model, inputs)   generate stage
    verdicts.jsonl           VerdictRow per (example, judge, inputs)      judge stage
    paraphrases.jsonl        GenerationRow (S3FT paraphrases of gold)     judge stage
    paraphrase_verdicts.jsonl VerdictRow of the paraphrases               judge stage
    rehearsal.jsonl          RehearsalRow per example                     build stage
    build_stats.json         BuildStats                                   build stage
    metrics.jsonl            MetricRow per optimizer step                 train stage
    checkpoints/step-N/      see ssrengine.training.checkpoint                     train stage
    tensorboard/             TensorBoard event files (train.report_to)    train stage
    provenance.json          Provenance per stage: what its output was made from
    eval/                    see `EvalDir`                                eval
    export/trl/              the rehearsal set for another trainer        export
    export/hf/               a checkpoint as an HF model (LoRA: merged)   export --format hf
    export/merged-step-N/    a LoRA checkpoint merged on demand (models.lora.hf_dir)  eval

Here: the paths (`RunDir`, `EvalDir`) and the rows of the pipeline's stages. Every row is a
`ssrengine.core.rows.Row`; provenance.json is `ssrengine.core.provenance`, the rows of eval/
`ssrengine.core.eval_rows`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_text, read_json
from ssrengine.core.rows import Row, json_object

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
TENSORBOARD = "tensorboard"
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
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.root / EVAL)

    def export(self, fmt: str) -> Path:
        return self.root / EXPORT / fmt


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

    @classmethod
    def from_json(cls, obj: Any, file: str, line: int | None = None) -> VerdictRow:
        row = super().from_json(obj, file, line)
        if not math.isfinite(row.score):  # written by an older version: never reused
            raise InputError(
                f"not a finite number: {row.score!r}", file=file, line=line, field="score"
            )
        return row


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
        """``example``'s (an `ssrengine.data.records.Example`) prompt with ``target`` from ``source``;
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
        obj = json_object(obj, file, None)
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
    mfu: float | None = (
        None  # model FLOPs utilization (ssrengine.models.flops); None: CPU, unknown GPU
    )
    eval_loss: float | None = None  # validation loss, at the steps train.eval_every names

    _OMIT_NONE = ("eval_loss",)
