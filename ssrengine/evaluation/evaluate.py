"""``python -m ssrengine eval RUN_OR_MODEL``: task metrics and retention of general ability.

Task metrics: see `ssrengine.evaluation.metrics` (computed from answers; nothing there runs a model).
Retention: see `ssrengine.evaluation.retention` (probe accuracy, multiple-choice accuracy, the base
model's own answers' likelihood, lm-eval where installed).

RUN_OR_MODEL is a run directory (its newest checkpoint and its config.json: system prompt,
generation settings, base model) or a model (directory or embedded name: evaluated as a base).
A LoRA checkpoint without the merged model (the newest of an interrupted run) is merged once
into RUN/export/merged-step-N (`ssrengine.models.lora.hf_dir`).
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

import numpy as np

from ssrengine.core.config import Config
from ssrengine.core.config_load import load_config, saved_config
from ssrengine.core.errors import InputError
from ssrengine.core.eval_rows import (
    EvalResult,
    MCDetail,
    ProbeDetail,
    SelfVsGold,
    SelfVsGoldRow,
    SplitMetrics,
)
from ssrengine.core.io import atomic_write_json, atomic_write_jsonl
from ssrengine.core.rows import read_typed
from ssrengine.core.rundir import EvalDir, GenerationRow, RunDir, VerdictRow
from ssrengine.core.runlock import lock_run_dir
from ssrengine.data.builtin import GOLD_REFUSAL, resolve_data_file
from ssrengine.data.records import Example, load_examples, prompt_messages
from ssrengine.evaluation import stats
from ssrengine.evaluation.metrics import DECISION_AUC, retention_metrics, task_metrics
from ssrengine.evaluation.retention import (
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
from ssrengine.generation import Generator
from ssrengine.generation.hf import HFGenerator
from ssrengine.models.fetch import EMBEDDED, resolve_model_path, resolve_once
from ssrengine.models.loading import load_model, load_tokenizer, pick_device
from ssrengine.models.lora import hf_dir
from ssrengine.rehearsal.judge import gold_declines
from ssrengine.rehearsal.prepare import prepare
from ssrengine.rehearsal.stages import generate_rows, open_generator
from ssrengine.training.checkpoint import verified_checkpoint

log = logging.getLogger(__name__)

DEFAULT_SPLITS = (("in_domain", "builtin:test"), ("out_of_domain", "builtin:ood"))


# ------------------------------------------------------------------------- eval targets
@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    splits: tuple[tuple[str, str], ...] = DEFAULT_SPLITS  # (name, data spec)
    # Questions per split (0 = all): half answerable, half unanswerable, drawn with ``seed``.
    limit: int = 100
    seed: int = 0  # the subsets drawn under every limit, and the bootstrap resamples
    # The other parts of eval; None = bounded by ``limit`` too, so a small eval is fast.
    probe_file: str = ""  # empty = the shipped probe
    probe_limit: int | None = None
    mc_file: str = ""  # empty = the shipped multiple-choice set
    mc_limit: int | None = None
    self_vs_gold_limit: int | None = None  # training examples scored for the paper's Figure 1
    lm_eval: str = "auto"  # auto: run where lm-eval is installed; on; off
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_local: tuple[str, ...] = ()  # empty = the shipped multiple-choice set
    lm_eval_limit: int | None = None
    # The decision probe: log p(refusal | prompt) per question, ranked between the classes.
    refusal: str = GOLD_REFUSAL
    lm_eval_batch_size: int = 8
    base_eval: str = ""  # an earlier eval of the base: reuse its probe answers

    def bound(self, part: int | None) -> int:
        """A part's own limit, or the split limit where it has none (0 = all)."""
        return self.limit if part is None else part


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
        # The run's settings, but never code it names (trust_remote_code, launch_python, a
        # python: judge): those come from this command line only.
        cfg = saved_config(rd.config, overrides)
        # The newest checkpoint whose files match their recorded checksums; a damaged newer
        # one is named in a warning.
        ckpt = verified_checkpoint(rd.checkpoints)
        if ckpt is None:
            raise InputError(
                "no finished checkpoint; train the run first", file=str(rd.checkpoints)
            )
        return Target(
            name=p.name,
            kind="run",
            mode=cfg.run.mode,
            # A LoRA checkpoint but the final one holds the adapter only: merged once here.
            model=str(hf_dir(ckpt, cfg)),
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
def split_examples(spec: str, cfg: Config, opts: EvalOptions) -> list[Example]:
    """A split's questions under ``opts.limit``: class-balanced and seeded, in file order."""
    path = resolve_data_file(spec, cfg.data.seed)
    examples = load_examples(
        path,
        on_invalid=cfg.data.on_invalid,
        max_record_bytes=cfg.data.max_record_bytes,
        columns=cfg.data.columns,
    )
    return stats.balanced_subset(
        examples, [gold_declines(e) for e in examples], opts.limit, opts.seed
    )


def refusal_scores(
    cfg: Config, m: Loaded, examples: list[Example], refusal: str
) -> dict[str, float]:
    """The decision probe: log p(refusal | prompt) per question under the model, one packed
    forward per question and no generation. The prompt is the one the answers were generated
    from; the refusal is the same text for every question, so sums compare directly."""
    prompts = [prompt_messages(e.messages, e.documents, cfg.data.system_prompt) for e in examples]
    scores = score_sequences(m.lm, chat_sequences(m.tok, prompts, [refusal] * len(examples)))
    return {e.id: lp for e, (lp, _) in zip(examples, scores)}


def _evaluate_splits(
    t: Target, opts: EvalOptions, m: Loaded, split_sets: dict[str, list[Example]]
) -> dict[str, SplitMetrics]:
    out = {}
    for name, spec in opts.splits:
        examples = split_sets[name]
        rows = _generate(t.cfg, t.out, examples, m.gen, t.eval_dir.split(name), chat=True)
        refusal = refusal_scores(t.cfg, m, examples, opts.refusal)
        answers = {i: r.response for i, r in rows.items()}
        metrics, details = task_metrics(examples, answers, refusal, seed=opts.seed)
        atomic_write_jsonl(t.eval_dir.split_details(name), [d.to_json() for d in details])
        out[name] = replace(metrics, data=spec)
        p = metrics.paper or {}
        log.info(
            "%s: answerable acc %.3f  unanswerable acc %.3f  answer recall %.3f  "
            "decision AUC %.3f  (n=%d)",
            name,
            p["answerable_acc"]["value"],
            p["unanswerable_acc"]["value"],
            p["answer_recall"]["value"],
            p.get(DECISION_AUC, {}).get("value", float("nan")),
            metrics.n,
        )
    return out


def self_vs_gold(t: Target, model: Any, tok: Any, limit: int, seed: int = 0) -> SelfVsGold | None:
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
    examples = stats.balanced_subset(examples, [gold_declines(e) for e in examples], limit, seed)
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
    atomic_write_json(t.eval_dir.self_vs_gold, res.to_json())
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
        limit=opts.bound(opts.lm_eval_limit),
        batch_size=opts.lm_eval_batch_size,
        device=str(pick_device(t.cfg.model.device)),
        dtype=t.cfg.model.dtype,
    )


def _base_answers(dst: EvalDir, base_eval: str) -> list[GenerationRow] | None:
    """The base eval's probe answers to start probe_base.jsonl from (None: nothing to seed).
    Rows are keyed by model + prompt + sampling, so rows made with other settings are simply
    not reused."""
    src = RunDir(Path(base_eval)).eval.probe_base if base_eval else None
    if src is None or dst.probe_base.exists() or src.resolve() == dst.probe_base.resolve():
        return None
    if not src.is_file():
        raise InputError("no probe answers of the base here; eval the base first", file=str(src))
    return list(read_typed(src, GenerationRow))


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
    t: Target, m: Loaded, probe: _Probe, mc: list[MCItem], *, is_base: bool, seed: int
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
    n = len(probe.items)
    per_token = stats.ratio_stat([s for s, _ in lp], [k for _, k in lp])
    own["ci"] = stats.estimate(lambda idx: np.exp(per_token(idx)), n, seed=seed)
    pm = probe_metrics(probe.items, answers)
    pm["ci"] = stats.estimate(
        stats.mean_stat([pm["correct"][p.id] for p in probe.items]), n, seed=seed
    )
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
    mcm = mc_accuracy(m.lm, m.tok, mc)
    correct = mcm.pop("correct")
    mcm["ci"] = stats.estimate(stats.mean_stat(correct), len(mc), seed=seed)
    atomic_write_jsonl(
        t.eval_dir.mc_details, [MCDetail(it.id, c).to_json() for it, c in zip(mc, correct)]
    )
    return {"probe": pm, "mc": mcm, "own_answers": own}


@resolve_once()
def run_eval(t: Target, opts: EvalOptions) -> EvalResult:
    """Evaluate ``t``; write and return OUT/eval/eval.json."""
    t0 = time.perf_counter()
    # Every input read before anything is written: a bad one leaves OUT as it was.
    items = stats.seeded_subset(
        load_probe(opts.probe_file or None), opts.bound(opts.probe_limit), opts.seed
    )
    probe_ex = [p.example() for p in items]
    mc = stats.seeded_subset(load_mc(opts.mc_file or None), opts.bound(opts.mc_limit), opts.seed)
    split_sets = {name: split_examples(spec, t.cfg, opts) for name, spec in opts.splits}
    seed_rows = _base_answers(t.eval_dir, opts.base_eval)
    if opts.lm_eval == "on" and not lm_eval_available():
        _lm_eval(t, opts)  # its one line, before any work
    same = t.model == t.base
    with _loaded(t.cfg, t.base) as base:
        t.eval_dir.root.mkdir(parents=True, exist_ok=True)
        if seed_rows is not None:
            atomic_write_jsonl(t.eval_dir.probe_base, [r.to_json() for r in seed_rows])
        base_rows = _generate(t.cfg, t.out, probe_ex, base.gen, t.eval_dir.probe_base, chat=False)
        probe = _Probe(items, probe_ex, base_rows, _own_answer_scores(base, probe_ex, base_rows))
        fig1 = self_vs_gold(t, base.lm, base.tok, opts.bound(opts.self_vs_gold_limit), opts.seed)
        if same:
            splits = _evaluate_splits(t, opts, base, split_sets)
            retention = _retention(t, base, probe, mc, is_base=True, seed=opts.seed)
    if not same:
        with _loaded(t.cfg, t.model) as m:
            splits = _evaluate_splits(t, opts, m, split_sets)
            retention = _retention(t, m, probe, mc, is_base=False, seed=opts.seed)
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
    # Strict JSON: an undefined number (an AUC over one class, an empty interval) is null.
    atomic_write_json(t.eval_dir.eval_json, result.to_json())
    return result


# ----------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalOptions()  # the defaults live in EvalOptions only
    p.add_argument("target", help="a run directory, a model directory or an embedded model name")
    p.add_argument(
        "--out", help="directory that gets eval/ (default: the run dir, or runs/base-NAME)"
    )
    p.add_argument(
        "--base", help="base model for the drift reference (default: the run's model.path)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=d.limit,
        help="questions per split, half answerable and half unanswerable, drawn with --seed; "
        "also bounds the probe, MC set, Figure 1 and lm-eval unless their own limit is given; "
        f"0 = all (default {d.limit})",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the limited subsets and the bootstrap"
    )
    p.add_argument(
        "--refusal",
        default=d.refusal,
        help=f"refusal text of the decision probe (default {d.refusal!r})",
    )
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME=DATA",
        help="a split to evaluate, e.g. in_domain=builtin:test (repeatable; default: "
        "in_domain=builtin:test and out_of_domain=builtin:ood)",
    )
    p.add_argument(
        "--probe-file", default=d.probe_file, help="retention probe JSONL (default: shipped)"
    )
    p.add_argument("--probe-limit", type=int, help="probe prompts, 0 = all (default: as --limit)")
    p.add_argument("--mc-file", default=d.mc_file, help="multiple-choice JSONL (default: shipped)")
    p.add_argument(
        "--mc-limit", type=int, help="multiple-choice items, 0 = all (default: as --limit)"
    )
    p.add_argument(
        "--self-vs-gold-limit",
        type=int,
        help="training examples for Figure 1, 0 = all (default: as --limit)",
    )
    p.add_argument(
        "--lm-eval",
        choices=("auto", "on", "off"),
        default=d.lm_eval,
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
        "--lm-eval-limit",
        type=int,
        help="examples per lm-eval task, 0 = all (default: as --limit)",
    )
    p.add_argument("--lm-eval-batch-size", type=int, default=d.lm_eval_batch_size)
    p.add_argument(
        "--base-eval",
        default=d.base_eval,
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
        seed=args.seed,
        refusal=args.refusal,
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


@resolve_once()
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
    for name, m in res.splits.items():
        p = m.paper or {}
        parts += [
            f"{name}: ans.acc {p['answerable_acc']['value']:.3f} "
            f"unans.acc {p['unanswerable_acc']['value']:.3f} "
            f"recall {p['answer_recall']['value']:.3f} "
            f"AUC {p.get(DECISION_AUC, {}).get('value', float('nan')):.3f}"
        ]
    parts += [f"{k} {v:.3f}" for k, v in res.retention_metrics.items()]
    return "  ".join(parts)
