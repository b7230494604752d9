"""provenance.json: what each stage's output was made from (the config keys its work depends
on), so a rerun with changed settings is refused or redone, never mixed into the old output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ssrengine.core.io import atomic_write_text, read_json
from ssrengine.core.rows import Row, json_object
from ssrengine.core.rundir import RunDir

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
        "judge.match",
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
    "train.callbacks",
    "train.log_every",
    "train.loss_grad_filter",
    # Limits that stop a run or not and otherwise change nothing.
    "data.max_record_bytes",
    "train.divergence_factor",
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
    obj = json_object(read_json(rd.provenance), str(rd.provenance), None)
    return {k: Provenance.from_json(v, str(rd.provenance), at=f"{k}.") for k, v in obj.items()}


def write_provenance(rd: RunDir, record: Provenance) -> None:
    records = read_provenance(rd) | {record.stage: record}
    text = json.dumps({k: v.to_json() for k, v in records.items()}, indent=2) + "\n"
    atomic_write_text(rd.provenance, text)
