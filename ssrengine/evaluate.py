"""``python -m ssrengine eval RUN_OR_MODEL``: task metrics and retention of general ability.

Task metrics: see `ssrengine.metrics` (computed from answers; nothing there runs a model).
Retention: see `ssrengine.retention` (probe accuracy, multiple-choice accuracy, the base
model's own answers' likelihood, lm-eval where installed).

RUN_OR_MODEL is a run directory (its newest checkpoint and its config.json: system prompt,
generation settings, base model) or a model (directory or embedded name: evaluated as a base).
Everything goes to OUT/eval/ (OUT = the run dir, or --out; files in `rundir.EvalDir`):
generations as resumable row files (a killed eval resumes), per-example details, and eval.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ssrengine.checkpoint import latest_checkpoint
from ssrengine.config import Config, build_config, load_config, parse_overrides
from ssrengine.data import Example, load_examples, prompt_messages
from ssrengine.datasets import resolve_data_file
from ssrengine.errors import InputError
from ssrengine.generation import Generator
from ssrengine.generation.hf import HFGenerator
from ssrengine.io import atomic_write_jsonl, atomic_write_text, read_json
from ssrengine.judge import gold_declines
from ssrengine.metrics import retention_metrics, task_metrics
from ssrengine.models import EMBEDDED, load_model, load_tokenizer, pick_device, resolve_model_path
from ssrengine.retention import (
    MC_FILE,
    MCItem,
    ProbeItem,
    answer_token_sequences,
    asset_path,
    chat_sequences,
    lm_eval_available,
    load_mc,
    load_probe,
    mc_accuracy,
    own_answer_stats,
    probe_metrics,
    run_lm_eval,
    score_sequences,
)
from ssrengine.rundir import (
    EvalDir,
    EvalResult,
    GenerationRow,
    ProbeDetail,
    RunDir,
    SelfVsGold,
    SelfVsGoldRow,
    SplitMetrics,
    VerdictRow,
    read_typed,
)
from ssrengine.runlock import lock_run_dir
from ssrengine.stages import generate_rows, open_generator, prepare

log = logging.getLogger(__name__)

DEFAULT_SPLITS = (("in_domain", "builtin:test"), ("out_of_domain", "builtin:ood"))


# ------------------------------------------------------------------------- eval targets
@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    splits: tuple[tuple[str, str], ...] = DEFAULT_SPLITS  # (name, data spec)
    limit: int = 100  # examples per split (0 = all)
    probe_file: str = ""  # empty = the shipped probe
    probe_limit: int = 0
    mc_file: str = ""  # empty = the shipped multiple-choice set
    mc_limit: int = 0
    self_vs_gold_limit: int = 128  # training examples scored for the paper's Figure 1
    lm_eval: str = "auto"  # auto: run where lm-eval is installed; on; off
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_local: tuple[str, ...] = ()  # empty = the shipped multiple-choice set
    lm_eval_limit: int = 0
    lm_eval_batch_size: int = 8
    base_eval: str = ""  # an earlier eval of the base: reuse its probe answers


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "run" | "model"
    # a run: its run.mode ("sft" | "ssr"); a model: "base", or "model" when --base names
    # another model (then it is compared with that base)
    mode: str
    model: str  # what is evaluated: a checkpoint dir, a model dir or an embedded name
    base: str  # the base model: its own answers are the reference of the drift
    out: Path  # eval files go to out/eval
    run_dir: Path | None
    cfg: Config

    @property
    def eval_dir(self) -> EvalDir:
        return RunDir(self.out).eval


def _is_run_dir(p: Path) -> bool:
    """A run dir's config.json is an ssrengine config (sections), not an HF model config."""
    try:
        saved = json.loads(RunDir(p).config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "run" in saved and "model" in saved


def resolve_target(
    target: str,
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    base: str | None = None,
) -> Target:
    """A run dir → its newest checkpoint with its own config (overrides apply on top);
    anything else → a model evaluated as the base, with --config/overrides or the defaults."""
    p = Path(target)
    if p.is_dir() and _is_run_dir(p):
        rd = RunDir(p)
        raw = read_json(rd.config)
        for sec, values in parse_overrides(overrides or []).items():
            raw.setdefault(sec, {}).update(values)
        cfg = build_config(raw, source=str(rd.config))
        ckpt = latest_checkpoint(rd.checkpoints)
        if ckpt is None:
            raise InputError(
                "no finished checkpoint; train the run first", file=str(rd.checkpoints)
            )
        return Target(
            name=p.name,
            kind="run",
            mode=cfg.run.mode,
            model=str(ckpt),
            base=base or cfg.model.path,
            out=Path(out) if out else p,
            run_dir=p,
            cfg=cfg,
        )
    if target not in EMBEDDED:
        resolve_model_path(target)  # fail before any work on a path that is not a model
    cfg = load_config(config, [*(overrides or []), f"--model.path={target}"])
    name = Path(target).name or target
    return Target(
        name=f"base-{name}" if not base else name,
        kind="model",
        mode="base" if not base or base == target else "model",
        model=target,
        base=base or target,
        out=Path(out) if out else Path("runs") / f"base-{name}",
        run_dir=None,
        cfg=cfg,
    )


@dataclass(frozen=True)
class Loaded:
    """A model loaded for eval: its generator, the module that scores, its tokenizer."""

    gen: Generator
    lm: Any
    tok: Any


@contextmanager
def _loaded(cfg: Config, path: str) -> Iterator[Loaded]:
    """The model at ``path``. The hf backend generates with the scoring model itself."""
    tok = load_tokenizer(
        path, trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template
    )
    lm = load_model(
        path,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.generation.backend == "hf":
        gen: Generator = HFGenerator(
            cfg.model, replace(cfg.generation, model=path), hf_model=lm, tokenizer=tok
        )
    else:
        gen = open_generator(replace(cfg, generation=replace(cfg.generation, model=path)))
    try:
        yield Loaded(gen, lm, tok)
    finally:
        gen.close()


def _generate(
    cfg: Config, out: Path, examples: list[Example], gen: Generator, path: Path, *, chat: bool
) -> dict[str, GenerationRow]:
    """Greedy answers into ``path`` (resumable); rows by id."""
    fn = None if chat else (lambda e: e.messages)  # probe prompts: no task instruction
    return generate_rows(cfg, out, examples, gen, path=path, messages_fn=fn)


# ------------------------------------------------------------------------------ eval run
def _evaluate_splits(t: Target, opts: EvalOptions, gen: Generator) -> dict[str, SplitMetrics]:
    out = {}
    for name, spec in opts.splits:
        path = resolve_data_file(spec, t.cfg.data.seed)
        examples = load_examples(path, on_invalid=t.cfg.data.on_invalid, max_examples=opts.limit)
        rows = _generate(t.cfg, t.out, examples, gen, t.eval_dir.split(name), chat=True)
        metrics, details = task_metrics(examples, {i: r.response for i, r in rows.items()})
        atomic_write_jsonl(t.eval_dir.split_details(name), [d.to_json() for d in details])
        out[name] = replace(metrics, data=spec)
        log.info(
            "%s: score %.1f  unanswerable F1 %.3f  answer recall %.3f  (n=%d)",
            name,
            metrics.score,
            metrics.unanswerable.f1,
            metrics.answer_recall,
            metrics.n,
        )
    return out


def self_vs_gold(t: Target, model: Any, tok: Any, limit: int) -> SelfVsGold | None:
    """Paper Figure 1: per-token log-probability of gold vs the model's own training answers
    under the base model, for an SSR run that has generations.jsonl."""
    if t.run_dir is None or not RunDir(t.run_dir).generations.exists():
        return None
    rd = RunDir(t.run_dir)
    gens = {r.id: r for r in read_typed(rd.generations, GenerationRow)}
    verdicts = (
        {r.id: r for r in read_typed(rd.verdicts, VerdictRow)} if rd.verdicts.exists() else {}
    )
    examples = [e for e in prepare(t.cfg) if e.id in gens and gens[e.id].response.strip()]
    examples = examples[:limit] if limit else examples
    if not examples:
        return None
    prompts = [prompt_messages(e.messages, e.documents, t.cfg.data.system_prompt) for e in examples]
    gold = score_sequences(model, chat_sequences(tok, prompts, [e.response for e in examples]))
    own = score_sequences(
        model, chat_sequences(tok, prompts, [gens[e.id].response for e in examples])
    )
    rows = [
        SelfVsGoldRow(
            id=e.id,
            unanswerable=gold_declines(e),
            accept=verdicts[e.id].accept if e.id in verdicts else None,
            gold_logprob=g[0] / max(g[1], 1),
            own_logprob=o[0] / max(o[1], 1),
            gold_tokens=g[1],
            own_tokens=o[1],
        )
        for e, g, o in zip(examples, gold, own)
    ]
    res = SelfVsGold(model=t.base, unit="mean log-probability per answer token", rows=rows)
    atomic_write_text(t.eval_dir.self_vs_gold, json.dumps(res.to_json(), indent=1) + "\n")
    return res


def _lm_eval(t: Target, opts: EvalOptions) -> dict[str, Any]:
    if opts.lm_eval == "off":
        return {"skipped": "--lm-eval off"}
    if not lm_eval_available():
        if opts.lm_eval == "on":
            raise InputError(
                "lm-eval is not installed (pip install 'ssrengine[eval]')", field="--lm-eval"
            )
        return {"skipped": "lm-eval is not installed (pip install 'ssrengine[eval]')"}
    local = list(opts.lm_eval_local) or [str(asset_path(MC_FILE))]
    return run_lm_eval(
        str(resolve_model_path(t.model)),
        tasks=opts.lm_eval_tasks,
        local_files=local,
        limit=opts.lm_eval_limit,
        batch_size=opts.lm_eval_batch_size,
        device=str(pick_device(t.cfg.model.device)),
        dtype=t.cfg.model.dtype,
    )


def _seed_base_answers(dst: EvalDir, base_eval: str) -> None:
    """Start probe_base.jsonl from the base eval's rows. Rows are keyed by model + prompt +
    sampling, so rows made with other settings are simply not reused."""
    src = RunDir(Path(base_eval)).eval.probe_base if base_eval else None
    if src is None or dst.probe_base.exists() or src.resolve() == dst.probe_base.resolve():
        return
    if not src.is_file():
        raise InputError("no probe answers of the base here; eval the base first", file=str(src))
    atomic_write_jsonl(dst.probe_base, [r.to_json() for r in read_typed(src, GenerationRow)])


@dataclass(frozen=True)
class _Probe:
    """The retention probe and the base model's answers to it: the reference of the drift."""

    items: list[ProbeItem]
    examples: list[Example]
    base_rows: dict[str, GenerationRow]
    base_scores: list[tuple[float, int]]


def _own_answer_scores(
    m: Loaded, probe: list[Example], rows: dict[str, GenerationRow]
) -> list[tuple[float, int]]:
    """The base model's exact greedy answer tokens, after the same prompt tokens, under ``m``."""
    ids = [rows[e.id].token_ids for e in probe]
    return score_sequences(m.lm, answer_token_sequences(m.tok, [e.messages for e in probe], ids))


def _retention(
    t: Target, m: Loaded, probe: _Probe, mc: list[MCItem], *, is_base: bool
) -> dict[str, Any]:
    """Probe accuracy, multiple-choice accuracy and own-answer likelihood of the model ``m``."""
    rows = (
        probe.base_rows
        if is_base
        else _generate(t.cfg, t.out, probe.examples, m.gen, t.eval_dir.probe, chat=False)
    )
    answers = {i: r.response for i, r in rows.items()}
    lp = probe.base_scores if is_base else _own_answer_scores(m, probe.examples, probe.base_rows)
    own, ref = own_answer_stats(lp), own_answer_stats(probe.base_scores)
    own["drift_per_token"] = own["logprob_per_token"] - ref["logprob_per_token"]
    own["base_logprob_per_token"] = ref["logprob_per_token"]
    pm = probe_metrics(probe.items, answers)
    details = [
        ProbeDetail(
            id=p.id,
            category=p.category,
            answer=answers[p.id],
            base_answer=probe.base_rows[p.id].response,
            correct=pm["correct"][p.id],
            logprob_base_answer=s / max(n, 1),
        )
        for p, (s, n) in zip(probe.items, lp)
    ]
    atomic_write_jsonl(t.eval_dir.probe_details, [d.to_json() for d in details])
    pm.pop("correct")
    return {"probe": pm, "mc": mc_accuracy(m.lm, m.tok, mc), "own_answers": own}


def run_eval(t: Target, opts: EvalOptions) -> EvalResult:
    """Evaluate ``t``; write and return OUT/eval/eval.json."""
    t0 = time.perf_counter()
    t.eval_dir.root.mkdir(parents=True, exist_ok=True)
    items = load_probe(opts.probe_file or None, opts.probe_limit)
    probe_ex = [p.example() for p in items]
    mc = load_mc(opts.mc_file or None, opts.mc_limit)
    same = t.model == t.base
    with _loaded(t.cfg, t.base) as base:
        _seed_base_answers(t.eval_dir, opts.base_eval)
        base_rows = _generate(t.cfg, t.out, probe_ex, base.gen, t.eval_dir.probe_base, chat=False)
        probe = _Probe(items, probe_ex, base_rows, _own_answer_scores(base, probe_ex, base_rows))
        fig1 = self_vs_gold(t, base.lm, base.tok, opts.self_vs_gold_limit)
        if same:
            splits = _evaluate_splits(t, opts, base.gen)
            retention = _retention(t, base, probe, mc, is_base=True)
    if not same:
        with _loaded(t.cfg, t.model) as m:
            splits = _evaluate_splits(t, opts, m.gen)
            retention = _retention(t, m, probe, mc, is_base=False)
    retention["lm_eval"] = _lm_eval(t, opts)
    result = EvalResult(
        name=t.name,
        kind=t.kind,
        mode=t.mode,
        model=t.model,
        base=t.base,
        run_dir=str(t.run_dir) if t.run_dir else None,
        splits=splits,
        retention=retention,
        retention_metrics=retention_metrics(retention),
        self_vs_gold=fig1 is not None,
        options=asdict(opts),
        config=t.cfg.to_dict(),
        wall_s=round(time.perf_counter() - t0, 1),
    )
    atomic_write_text(t.eval_dir.eval_json, json.dumps(result.to_json(), indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory, a model directory or an embedded model name")
    p.add_argument(
        "--out", help="directory that gets eval/ (default: the run dir, or runs/base-NAME)"
    )
    p.add_argument(
        "--base", help="base model for the drift reference (default: the run's model.path)"
    )
    p.add_argument(
        "--limit", type=int, default=100, help="examples per split, 0 = all (default 100)"
    )
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME=DATA",
        help="a split to evaluate, e.g. in_domain=builtin:test (repeatable; default: "
        "in_domain=builtin:test and out_of_domain=builtin:ood)",
    )
    p.add_argument("--probe-file", default="", help="retention probe JSONL (default: shipped)")
    p.add_argument("--probe-limit", type=int, default=0, help="probe prompts, 0 = all")
    p.add_argument("--mc-file", default="", help="multiple-choice JSONL (default: shipped)")
    p.add_argument("--mc-limit", type=int, default=0, help="multiple-choice items, 0 = all")
    p.add_argument(
        "--self-vs-gold-limit", type=int, default=128, help="training examples for Figure 1"
    )
    p.add_argument(
        "--lm-eval",
        choices=("auto", "on", "off"),
        default="auto",
        help="lm-eval-harness: auto = where installed",
    )
    p.add_argument(
        "--lm-eval-tasks",
        default="",
        help="comma-separated lm-eval tasks, e.g. mmlu,truthfulqa_mc2,gsm8k,hellaswag",
    )
    p.add_argument(
        "--lm-eval-local",
        action="append",
        default=[],
        help="local multiple-choice JSONL as an lm-eval task (repeatable; default: the shipped set)",
    )
    p.add_argument(
        "--lm-eval-limit", type=int, default=0, help="examples per lm-eval task, 0 = all"
    )
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument(
        "--base-eval",
        default="",
        help="OUT dir of an earlier eval of the base model: reuse its probe answers",
    )


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    splits = DEFAULT_SPLITS
    if args.split:
        parsed = []
        for s in args.split:
            name, sep, spec = s.partition("=")
            if not sep or not name or not spec:
                raise InputError(f"expected NAME=DATA, got {s!r}", field="--split")
            parsed.append((name, spec))
        splits = tuple(parsed)
    return EvalOptions(
        splits=splits,
        limit=args.limit,
        probe_file=args.probe_file,
        probe_limit=args.probe_limit,
        mc_file=args.mc_file,
        mc_limit=args.mc_limit,
        self_vs_gold_limit=args.self_vs_gold_limit,
        lm_eval=args.lm_eval,
        lm_eval_tasks=tuple(x for x in args.lm_eval_tasks.split(",") if x),
        lm_eval_local=tuple(args.lm_eval_local),
        lm_eval_limit=args.lm_eval_limit,
        lm_eval_batch_size=args.lm_eval_batch_size,
        base_eval=args.base_eval,
    )


def main(args: argparse.Namespace, overrides: list[str]) -> int:
    t = resolve_target(
        args.target, config=args.config, overrides=overrides, out=args.out, base=args.base
    )
    with lock_run_dir(t.out):  # eval writes t.out/eval: one command per directory at a time
        res = run_eval(t, options_from_args(args))
    print(summary_line(res))
    print(f"written: {t.eval_dir.eval_json}")
    return 0


def summary_line(res: EvalResult) -> str:
    parts = [f"{res.name} ({res.mode})"]
    parts += [f"{name} {m.score:.1f}" for name, m in res.splits.items()]
    parts += [f"{k} {v:.3f}" for k, v in res.retention_metrics.items()]
    return "  ".join(parts)
