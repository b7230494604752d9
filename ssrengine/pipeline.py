"""A run: check the run directory, fit the data once, then generate → judge → build → train.

Each stage records in provenance.json what its output was made from (`rundir.Provenance`:
the config values it depends on, upstream stages' included, and a hash of its input rows).
generate, judge and build redo their work when an input changed (their rows are keyed by
everything they depend on); train cannot redo a checkpoint, so a run dir whose checkpoints
were trained under other settings or on another rehearsal set is refused before anything is
written or computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_json
from ssrengine.core.provenance import (
    STAGES,
    Provenance,
    config_changes,
    flat_config,
    read_provenance,
    stage_config,
    write_provenance,
)
from ssrengine.core.rows import Row, content_hash, read_typed
from ssrengine.core.rundir import (
    BuildStats,
    GenerationRow,
    MetricRow,
    RehearsalRow,
    RunDir,
    VerdictRow,
)
from ssrengine.core.runlock import check_run_dir
from ssrengine.data.records import Example
from ssrengine.models.fetch import resolve_once
from ssrengine.rehearsal import stages
from ssrengine.rehearsal.build import format_stats, run_build
from ssrengine.rehearsal.prepare import prepare

log = logging.getLogger(__name__)

# Changing these under an existing run would silently mix artifacts of two different runs.
_PINNED = ("model", "data", "run.mode")
# ... but not these: a limit that changes no output when it does not stop the run.
_UNPINNED = ("data.max_record_bytes",)


def config_diff(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for the keys under ``keys`` set on both sides that differ (a key of
    one side only is one another ssrengine version added or removed, not the user's change)."""
    a, b = flat_config(old), flat_config(new)
    return [
        f"{k}: {a[k]!r} -> {b[k]!r}"
        for k in sorted(set(a) & set(b))
        if any(k == p or k.startswith(p + ".") for p in keys)
        and k not in _UNPINNED
        and a[k] != b[k]
    ]


def check_run_config(cfg: Config) -> Path:
    """The run directory, refused when it was made with another model/data/mode. Writes
    nothing: config.json is saved (`save_config`) only after a stage's own refusals passed, so
    a refused command leaves the run directory as it was."""
    run_dir = check_run_dir(cfg.run.dir)  # a file in the way, read-only, damaged config.json
    saved = RunDir(run_dir).config
    if saved.exists():
        diff = config_diff(read_json(saved), cfg.to_dict(), _PINNED)
        if diff:
            raise InputError(
                "this run directory was made with a different config (" + "; ".join(diff) + "); "
                "use a new run.dir",
                file=str(saved),
            )
    return run_dir


def save_config(cfg: Config, run_dir: Path) -> None:
    cfg.save(RunDir(run_dir).config)


def has_checkpoint(rd: RunDir) -> bool:
    if not rd.checkpoints.is_dir() or not any(rd.checkpoints.iterdir()):
        return False  # decided without importing torch
    from ssrengine.training.checkpoint import latest_checkpoint

    return latest_checkpoint(rd.checkpoints) is not None


def _retrain_hint(rd: RunDir) -> str:
    # TensorBoard's event files would show both trainings as one run, two points per step.
    return (
        f"rerunning here would mix two runs: use a new run.dir, or delete {rd.checkpoints}, "
        f"{rd.metrics} and {rd.tensorboard} to train again here"
    )


RUN_LENGTH = ("train.max_steps", "train.epochs")


def check_checkpoints_match(cfg: Config, *, resume: bool = False) -> None:
    """Refuse, before anything is computed or written, what cannot end well: ``--resume``
    without a checkpoint, or checkpoints trained under settings other than ``cfg``'s."""
    rd = RunDir(Path(cfg.run.dir))
    trained = has_checkpoint(rd)
    if resume and not trained:
        raise InputError(
            "--resume given but there is no checkpoint to resume from", file=str(rd.checkpoints)
        )
    if not trained:
        return
    record = read_provenance(rd).get("train")
    if record is None:
        raise InputError(
            "these checkpoints have no record of what they were trained on (made by an older "
            f"ssrengine); {_retrain_hint(rd)}",
            file=str(rd.checkpoints),
        )
    changes = config_changes(record.config, stage_config(cfg.to_dict(), "train"))
    # The run length may change: a longer train.max_steps or train.epochs extends the run
    # from its last checkpoint (training.optim: the schedule of the new length).
    changes = [c for c in changes if c.partition(":")[0] not in RUN_LENGTH]
    if changes:
        raise InputError(
            f"these checkpoints were trained with other settings ({'; '.join(changes)}); "
            + _retrain_hint(rd),
            file=str(rd.checkpoints),
        )


def rows_hash(rows: Iterable[Row]) -> str:
    return content_hash([r.to_json() for r in rows])


def _samples_hash(cfg: Config, run_dir: Path, examples: list[Example]) -> str:
    """The rows of every generation.num_samples answer (one sample: the same hash as before)."""
    samples = stages.current_samples(cfg, run_dir, examples)
    return rows_hash(row for gens in samples for row in gens.values())


def _record(cfg: Config, rd: RunDir, stage: str, inputs: str, output: str = "") -> None:
    config = stage_config(cfg.to_dict(), stage)
    write_provenance(rd, Provenance(stage, config, inputs, output))


@resolve_once()
def run_stage(
    cfg: Config, stage: str, *, resume: bool = False, examples: list[Example] | None = None
) -> Any:
    """One stage into run.dir. ``examples``: the output of `prepare` (read if omitted)."""
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    check_checkpoints_match(cfg, resume=resume)
    if stage in ("generate", "judge") and cfg.run.mode == "sft":
        log.info("%s: skipped (run.mode = sft trains on gold answers only)", stage)
        return None
    if stage == "train":
        return _train(cfg, resume)
    examples = examples if examples is not None else prepare(cfg)
    run_dir = check_run_config(cfg)
    rd = RunDir(run_dir)
    if stage == "generate":
        _check_rows(rd.generations, GenerationRow)
        save_config(cfg, run_dir)
        gens = stages.run_generate(cfg, run_dir, examples)
        inputs = content_hash([e.to_record() for e in examples])
        _record(cfg, rd, stage, inputs, _samples_hash(cfg, run_dir, examples))
        return gens
    if stage == "judge":
        generated = _samples_hash(cfg, run_dir, examples)  # refuses stale generations first
        _check_rows(rd.verdicts, VerdictRow)
        save_config(cfg, run_dir)
        verdicts = stages.run_judge(cfg, run_dir, examples)
        rejected = [e for e in examples if not verdicts[e.id].accept]
        if cfg.judge.paraphrase:
            stages.run_paraphrase(cfg, run_dir, rejected)
        if cfg.judge.prefix:
            stages.run_prefix(cfg, run_dir, rejected)
        output = content_hash([[i, v.accept, v.score] for i, v in sorted(verdicts.items())])
        _record(cfg, rd, stage, generated, output)
        return verdicts
    stats = run_build(cfg, run_dir, examples)  # refuses stale rows before writing
    save_config(cfg, run_dir)
    upstream = read_provenance(rd).get("judge") if cfg.run.mode == "ssr" else None
    inputs = content_hash([[e.to_record() for e in examples], upstream and upstream.output])
    _record(cfg, rd, stage, inputs, rows_hash(read_typed(rd.rehearsal, RehearsalRow)))
    print(f"rehearsal set ({cfg.run.mode}):\n{format_stats(stats)}")
    return stats


def _check_rows(path: Path, cls: type[Row]) -> None:
    """A stage file's rows, read before config.json is saved: a damaged one (not UTF-8, a row
    of the wrong shape) stops the command with the run directory as it was."""
    if path.exists():
        for _ in read_typed(path, cls):
            pass


def check_rehearsal(cfg: Config, rd: RunDir, *, settings: dict[str, Any] | None = None) -> str:
    """The hash of rehearsal.jsonl after checking it is what the build stage makes under
    ``cfg``: built under these settings and not changed since. A rehearsal set the build stage
    did not write (no build record: the user's own) is taken as given. ``settings``: the config
    to compare with instead of ``cfg``'s (a saved config.json as written, code settings
    included: compared as data, never run)."""
    if not rd.rehearsal.exists():
        raise InputError("missing; run the build stage first", file=str(rd.rehearsal))
    rows = rows_hash(read_typed(rd.rehearsal, RehearsalRow))
    build = read_provenance(rd).get("build")
    if build is None:
        log.info("%s has no build record: using it as given", rd.rehearsal)
        return rows
    why = config_changes(build.config, stage_config(settings or cfg.to_dict(), "build"))
    if build.output != rows:
        why.append("its rows changed since the build stage wrote them")
    if why:
        raise InputError(
            f"not what the build stage makes under this config ({'; '.join(why)}); "
            "run the build stage first",
            file=str(rd.rehearsal),
        )
    return rows


def _train(cfg: Config, resume: bool) -> Path:
    # The trainer (torch.distributed, the kernels) is imported by the train stage only.
    from ssrengine.training import distributed
    from ssrengine.training.trainer import train

    run_dir = check_run_config(cfg)
    rd = RunDir(run_dir)
    inputs = check_rehearsal(cfg, rd)
    trained = has_checkpoint(rd)
    if trained and read_provenance(rd)["train"].inputs != inputs:
        # check_checkpoints_match made sure the record exists
        raise InputError(
            "these checkpoints were trained on another rehearsal set; " + _retrain_hint(rd),
            file=str(rd.checkpoints),
        )
    main = distributed.init(cfg.model.device).is_main

    def started() -> None:
        """The trainer's first write, after its own refusals (a damaged checkpoint, the data)."""
        if main:
            save_config(cfg, run_dir)
            if not trained:
                _record(cfg, rd, "train", inputs)  # a killed run's checkpoints have it

    return train(cfg, run_dir, require_resume=resume, on_start=started)


@resolve_once()
def run_all(cfg: Config, *, resume: bool = False) -> Path:
    """Every stage in order into run.dir; finished work is skipped. Returns the final checkpoint.

    Under torchrun the data stages run on rank 0 while the other ranks wait; all ranks train."""
    from ssrengine.training import distributed

    check_checkpoints_match(cfg, resume=resume)
    if cfg.run.mode == "ssr":  # a judge that cannot be built (spec, rubric, pattern) stops first
        stages.make_judge(cfg, stages.open_generator(cfg, for_judge=True))
    world = distributed.init(cfg.model.device)
    if world.is_main:
        # Validated and fitted to data.max_seq_len once, before generate: a bad or over-long
        # record stops the run here, naming its file and line.
        examples = prepare(cfg)
        for stage in STAGES[:-1]:
            run_stage(cfg, stage, examples=examples)
    distributed.barrier()
    final = run_stage(cfg, "train", resume=resume)
    if not world.is_main:
        return final
    rd = RunDir(Path(cfg.run.dir))
    stats = BuildStats.read(rd.build_stats).overall
    last = list(read_typed(rd.metrics, MetricRow))
    print(f"\nrun dir:     {rd.root}")
    print(
        f"R/G split:   R (self) {stats.own}  paraphrase {stats.paraphrase}  "
        f"prefix {stats.prefix}  G (gold) {stats.gold}  (R share {stats.r_share:.1%})"
    )
    if last:
        print(f"final loss:  {last[-1].loss:.4f} at step {last[-1].step}")
    print(f"checkpoint:  {final}")
    return final
