"""The build stage: rehearsal.jsonl (each example's target: the first accepted own answer,
paraphrase or prefix continuation, else gold) and build_stats.json, both written whole,
atomically, from the rows of the current keys only."""

from __future__ import annotations

import logging
from pathlib import Path

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_jsonl
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import (
    BuildStats,
    GenerationRow,
    RehearsalRow,
    RunDir,
    VerdictRow,
)
from ssrengine.data.records import Example
from ssrengine.rehearsal import prefix_tier
from ssrengine.rehearsal.prepare import prepare
from ssrengine.rehearsal.selection import answerable_gold
from ssrengine.rehearsal.stages import (
    K,
    current_generations,
    current_samples,
    current_verdicts,
    first_accepted,
    prefix_tokenizer,
    verdict_input_hash,
)

log = logging.getLogger(__name__)


def _stage_rows(path: Path, cls: type[K], stage: str) -> dict[str, K]:
    """Latest row per id of a finished stage file (later rows win: they match the newest key)."""
    if not path.exists():
        raise InputError(f"missing; run the {stage} stage first", file=str(path))
    return {r.id: r for r in read_typed(path, cls)}


def run_build(cfg: Config, run_dir: Path, examples: list[Example] | None = None) -> BuildStats:
    """R (accepted own answers) + paraphrases + gold-decision prefixes + G (gold) →
    rehearsal.jsonl and build_stats.json.

    Reads only rows made under ``cfg``: the generation of each example's current prompt and
    sampling, and the configured judge's verdict on exactly that example and answer."""
    rd = RunDir(run_dir)
    examples = examples if examples is not None else prepare(cfg)
    targets: dict[str, tuple[str, str]] = {e.id: (e.response, "gold") for e in examples}
    if cfg.run.mode == "ssr":
        samples = current_samples(cfg, run_dir, examples)
        chosen = first_accepted(
            examples,
            samples,
            lambda todo, gens: current_verdicts(cfg, rd.verdicts, todo, gens),
        )
        verdicts = {i: v for i, (_, v) in chosen.items()}
        for e in examples:
            s, v = chosen[e.id]
            if v.accept and samples[s][e.id].response.strip():
                targets[e.id] = (samples[s][e.id].response, "self")
        rejected = [e for e in examples if targets[e.id][1] == "gold"]
        if cfg.judge.paraphrase and rejected:
            para = current_generations(cfg, run_dir, rejected, paraphrases=True)
            pverd = current_verdicts(cfg, rd.paraphrase_verdicts, rejected, para, paraphrases=True)
            for e in rejected:
                if pverd[e.id].accept and para[e.id].response.strip():
                    targets[e.id] = (para[e.id].response, "paraphrase")
        if cfg.judge.prefix:
            tok = prefix_tokenizer(cfg)
            conts = _stage_rows(rd.prefixes, GenerationRow, "judge (prefix tier)")
            cverd = _stage_rows(rd.prefix_verdicts, VerdictRow, "judge (prefix tier)")
            for e in examples:
                row, v = conts.get(e.id), cverd.get(e.id)
                if targets[e.id][1] != "gold" or row is None or not row.response.strip():
                    continue
                # the verdict counts only for the candidate rebuilt from this continuation
                text = prefix_tier.row_candidate(tok, e, row)
                if v is not None and v.accept and v.input_hash == verdict_input_hash(e, text):
                    targets[e.id] = (text, "prefix")
        if cfg.judge.gold_answerable_share:
            by_id = {e.id: e for e in examples}
            sources = {i: src for i, (_, src) in targets.items()}
            scores = {i: v.score for i, v in verdicts.items()}
            for i in answerable_gold(
                examples, sources, scores, cfg.judge.gold_answerable_share, cfg.train.seed
            ):
                targets[i] = (by_id[i].response, "gold")
    rows = [RehearsalRow.of(e, *targets[e.id]) for e in examples]
    stats = BuildStats.of(rows)
    atomic_write_jsonl(rd.rehearsal, [r.to_json() for r in rows])
    stats.write(rd.build_stats)
    return stats


def format_stats(stats: BuildStats) -> str:
    lines = []
    for k, s in stats.subsets().items():
        if s.n:
            lines.append(
                f"  {k:<13} n={s.n:<5} R (self)={s.own:<5} paraphrase={s.paraphrase:<5} "
                + (f"prefix={s.prefix:<5} " if s.prefix else "")
                + f"G (gold)={s.gold:<5} R share={s.r_share:.1%}"
            )
    return "\n".join(lines)
