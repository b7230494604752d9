"""The rows of eval/: per-question details, the probe and multiple-choice items, the
self-vs-gold log-probabilities (paper Figure 1) and eval.json itself (`EvalResult`).

These files are strict JSON: an undefined number (an AUC over one class, the interval of an
empty subset) is written as null and read back as NaN (`Row._NULL_AS_NAN`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssrengine.core.io import read_json
from ssrengine.core.rows import Row


class EvalRow(Row):
    """A row of eval/: null where a number is undefined, read back as NaN."""

    _NULL_AS_NAN = True


# --------------------------------------------------------------------------- eval rows
@dataclass(frozen=True)
class EvalDetail(EvalRow):
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
class ProbeDetail(EvalRow):
    """One retention probe prompt: the evaluated model's answer, the base model's, whether the
    answer is correct, and the base answer's log-probability per token under the model."""

    id: str
    category: str
    answer: str
    base_answer: str
    correct: bool
    logprob_base_answer: float


@dataclass(frozen=True)
class MCDetail(EvalRow):
    """One multiple-choice item: whether the model's argmax choice is the answer."""

    id: str
    correct: bool


@dataclass(frozen=True)
class SelfVsGoldRow(EvalRow):
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
class SelfVsGold(EvalRow):
    """OUT/eval/self_vs_gold.json: Figure 1 rows scored under the base model ``model``."""

    model: str
    unit: str
    rows: list[SelfVsGoldRow]


@dataclass(frozen=True)
class Confusion(EvalRow):
    """Answerable/unanswerable confusion matrix: ``matrix[gold class][behaviour]``."""

    rows: list[str]
    cols: list[str]
    matrix: list[list[int]]


@dataclass(frozen=True)
class UnanswerablePRF(EvalRow):
    """Detecting unanswerable questions by declining (positive class = unanswerable)."""

    precision: float
    recall: float
    f1: float
    accuracy: float
    support: int


@dataclass(frozen=True)
class SplitMetrics(EvalRow):
    """Task metrics of one eval split; ``score`` = mean of unanswerable F1 and answer recall, in
    points. ``data`` is the split's data spec (empty until the split is named in eval.json).
    ``paper``: the paper's metrics, each ``{value, lo, hi}`` with its 95% bootstrap interval
    (`ssrengine.evaluation.metrics.paper_metrics`); absent in evals made before it existed."""

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
class EvalResult(EvalRow):
    """OUT/eval/eval.json. ``retention`` is ssrengine.evaluation.retention's nested result;
    ``retention_metrics`` its flat "higher is better" numbers the report compares."""

    _NULL_AS_NAN_ANY = ("retention",)  # nested numbers of ssrengine.evaluation.retention

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
