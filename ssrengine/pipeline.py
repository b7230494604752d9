"""A run: prepare the run directory, then generate → judge → build → train, skipping done work."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ssrengine import stages
from ssrengine.config import Config
from ssrengine.errors import InputError
from ssrengine.rundir import BuildStats, MetricRow, RunDir, read_typed
from ssrengine.runlock import check_run_dir

log = logging.getLogger(__name__)

STAGES = ("generate", "judge", "build", "train")
# Changing these under an existing run would silently mix artifacts of two different runs.
_PINNED = ("model", "data", "run.mode")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if any(k == p or k.startswith(p + ".") for p in keys) and a.get(k) != b.get(k)
    ]


def prepare_run_dir(cfg: Config) -> Path:
    """Create run.dir and save config.json; refuse a run dir made with another model/data/mode."""
    run_dir = check_run_dir(cfg.run.dir)  # a file in the way, read-only, damaged config.json
    saved = RunDir(run_dir).config
    if saved.exists():
        diff = config_diff(json.loads(saved.read_text()), cfg.to_dict(), _PINNED)
        if diff:
            raise InputError(
                "this run directory was made with a different config (" + "; ".join(diff) + "); "
                "use a new run.dir",
                file=str(saved),
            )
    cfg.save(saved)
    return run_dir


def run_stage(cfg: Config, stage: str, *, resume: bool = False) -> Any:
    run_dir = prepare_run_dir(cfg)
    if stage in ("generate", "judge") and cfg.run.mode == "sft":
        log.info("%s: skipped (run.mode = sft trains on gold answers only)", stage)
        return None
    if stage == "generate":
        return stages.run_generate(cfg, run_dir)
    if stage == "judge":
        verdicts = stages.run_judge(cfg, run_dir)
        if cfg.judge.paraphrase:
            rejected = [e for e in stages.train_examples(cfg) if not verdicts[e.id].accept]
            stages.run_paraphrase(cfg, run_dir, rejected)
        return verdicts
    if stage == "build":
        stats = stages.run_build(cfg, run_dir)
        print(f"rehearsal set ({cfg.run.mode}):\n{stages.format_stats(stats)}")
        return stats
    if stage == "train":
        # torch is imported by the train stage only: the data stages on a server backend and
        # the rule judge run without it.
        from ssrengine.trainer import train

        return train(cfg, run_dir, require_resume=resume)
    raise InputError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def run_all(cfg: Config, *, resume: bool = False) -> Path:
    """Every stage in order into run.dir; finished work is skipped. Returns the final checkpoint.

    Under torchrun the data stages run on rank 0 while the other ranks wait; all ranks train."""
    from ssrengine import distributed

    world = distributed.init(cfg.model.device)
    if world.is_main:
        for stage in STAGES[:-1]:
            run_stage(cfg, stage)
    distributed.barrier()
    final = run_stage(cfg, "train", resume=resume)
    if not world.is_main:
        return final
    rd = RunDir(Path(cfg.run.dir))
    stats = BuildStats.read(rd.build_stats).overall
    last = list(read_typed(rd.metrics, MetricRow))
    print(f"\nrun dir:     {rd.root}")
    print(
        f"R/G split:   R (self) {stats.own}  paraphrase {stats.paraphrase}  G (gold) {stats.gold}  "
        f"(R share {stats.r_share:.1%})"
    )
    if last:
        print(f"final loss:  {last[-1].loss:.4f} at step {last[-1].step}")
    print(f"checkpoint:  {final}")
    return final
