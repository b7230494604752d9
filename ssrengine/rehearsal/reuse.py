"""``--reuse-generations OTHER_RUN``: another run's base-model answers as this run's, where
they were made from the same model and the same prompts.

A generation row's resume key (`GenerationRow.key`) covers the example id, the model and a
hash of the prompt, the sampling settings, the backend and the dtype: the rows of OTHER_RUN
whose key is one this config would make are the answers this run's generate stage would
produce (with greedy decoding, exactly; sampled, from the same seeds), so they are copied into
this run's generations.jsonl and the generate stage makes only the rest. The judge, build and
train stages then run as usual (the judge may differ between the two runs). Rows made from
another model or other prompts are never copied; when none match, one line says which differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.io import json_text, open_append
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import GenerationRow, RunDir
from ssrengine.data.records import Example
from ssrengine.rehearsal.stages import generation_keys, open_generator

log = logging.getLogger(__name__)


def reuse_generations(
    cfg: Config, run_dir: Path, other_run: str | Path, examples: list[Example]
) -> int:
    """Copy OTHER_RUN's generations that this config would make into run_dir; returns how
    many were copied (rows this run already has are skipped)."""
    source = RunDir(Path(other_run)).generations
    if cfg.run.mode != "ssr":
        raise InputError(
            "run.mode = sft trains on gold answers only and has no generate stage",
            field="--reuse-generations",
        )
    if Path(other_run).resolve() == Path(run_dir).resolve():
        raise InputError("is this run's own directory", field="--reuse-generations")
    if not source.is_file():
        raise InputError("missing: run that run's generate stage first", file=str(source))
    gen = open_generator(cfg)  # lazy: its names only, no model is loaded
    wanted = set()
    for sample in range(cfg.generation.num_samples):
        wanted |= set(generation_keys(cfg, examples, gen, sample=sample).values())
    rows = list(read_typed(source, GenerationRow))
    matching = [r for r in rows if r.key() in wanted]
    if not matching:
        raise InputError(_why_none(rows, gen.model), file=str(source))
    target = RunDir(Path(run_dir)).generations
    have = {r.key() for r in read_typed(target, GenerationRow)} if target.exists() else set()
    new = [r for r in matching if r.key() not in have]
    # One row per key: a file that holds a key twice (a resumed batch) gives it once.
    unique = list({r.key(): r for r in new}.values())
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open_append(target) as f:
        for r in unique:
            f.write(json_text(r.to_json()) + "\n")
    log.info(
        "--reuse-generations: %d of %s's %d generations match this config (%d copied, %d of "
        "this run's %d to generate)",
        len(matching),
        other_run,
        len(rows),
        len(unique),
        len(wanted) - len(have) - len(unique),
        len(wanted),
    )
    return len(unique)


def _why_none(rows: list[GenerationRow], model: str) -> str:
    if not rows:
        return "holds no generations"
    models = sorted({r.model for r in rows})
    if model not in models:
        return (
            f"none of its {len(rows)} generations is usable: they were made by model "
            f"{', '.join(map(repr, models))}, this config uses {model!r}"
        )
    return (
        f"none of its {len(rows)} generations is usable: same model {model!r}, but other "
        "prompts (the data, data.system_prompt, the chat template) or other generation "
        "settings (sampling, seed, generation.backend, model.dtype)"
    )
