"""``python -m ssrengine eval RUN_OR_MODEL``: task metrics and retention of general ability.

Task metrics (the SSR paper's, on held-out in-domain and out-of-domain splits): an answer is
"declined" when `judge.is_refusal` fires; the answerable/unanswerable confusion matrix, the
precision/recall/F1 of unanswerable detection (positive class = unanswerable, predicted by a
refusal), and token recall/F1 of the answers to answerable questions (a declined answer scores
0). The task score is the mean of unanswerable F1 and answer token recall, in points (0–100).

Retention: see `ssrengine.retention` (probe accuracy, multiple-choice accuracy, the base
model's own answers' likelihood, lm-eval where installed).

RUN_OR_MODEL is a run directory (its newest checkpoint and its config.json: system prompt,
generation settings, base model) or a model (directory or embedded name: evaluated as a base).
Everything goes to OUT/eval/ (OUT = the run dir, or --out): generations as resumable row files
(a killed eval resumes), per-example details, and eval.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ssrengine.config import Config, build_config, load_config, parse_overrides
from ssrengine.data import Example, load_examples, prompt_messages, resolve_data_file
from ssrengine.errors import InputError
from ssrengine.io import atomic_write_jsonl, atomic_write_text, read_rows
from ssrengine.judge import is_refusal, token_f1, token_recall
from ssrengine.runlock import lock_run_dir

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
EVAL_JSON = "eval.json"
SELF_VS_GOLD = "self_vs_gold.json"
DEFAULT_SPLITS = (("in_domain", "builtin:test"), ("out_of_domain", "builtin:ood"))
CONFUSION_LABELS = (("answerable", "unanswerable"), ("answered", "declined"))


# --------------------------------------------------------------------------- task metrics
def gold_unanswerable(e: Example) -> bool:
    """The label, or for unlabeled records whether the gold answer itself declines."""
    return e.answerable is False or (e.answerable is None and is_refusal(e.response))


def confusion_matrix(unanswerable: Sequence[bool], declined: Sequence[bool]) -> list[list[int]]:
    """[[answerable & answered, answerable & declined], [unanswerable & answered, unanswerable &
    declined]]: rows are the gold class, columns the model's behaviour."""
    m = [[0, 0], [0, 0]]
    for u, d in zip(unanswerable, declined, strict=True):
        m[int(u)][int(d)] += 1
    return m


def unanswerable_prf(m: list[list[int]]) -> dict[str, float]:
    """Precision/recall/F1 of detecting unanswerable questions (declining = predicting
    "unanswerable"), plus the accuracy of the two-way classification."""
    tp, fn, fp, tn = m[1][1], m[1][0], m[0][1], m[0][0]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    n = tp + fn + fp + tn
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "accuracy": (tp + tn) / n if n else 0.0,
        "support": tp + fn,
    }


def task_metrics(examples: Sequence[Example], responses: dict[str, str]) -> dict[str, Any]:
    """All task metrics of one split, and per-example details (for eval/<split>_details.jsonl)."""
    details = []
    for e in examples:
        ans = responses[e.id]
        unans, declined = gold_unanswerable(e), is_refusal(ans)
        row: dict[str, Any] = {"id": e.id, "unanswerable": unans, "declined": declined}
        if not unans:
            row["recall"] = 0.0 if declined else token_recall(ans, e.response)
            row["f1"] = 0.0 if declined else token_f1(ans, e.response)
        details.append(row)
    m = confusion_matrix([d["unanswerable"] for d in details], [d["declined"] for d in details])
    answerable = [d for d in details if not d["unanswerable"]]
    prf = unanswerable_prf(m)
    recall = sum(d["recall"] for d in answerable) / len(answerable) if answerable else 0.0
    f1 = sum(d["f1"] for d in answerable) / len(answerable) if answerable else 0.0
    metrics = {
        "n": len(details),
        "n_answerable": len(answerable),
        "confusion": {"rows": CONFUSION_LABELS[0], "cols": CONFUSION_LABELS[1], "matrix": m},
        "unanswerable": prf,
        "answer_recall": recall,
        "answer_f1": f1,
        "score": 100 * (prf["f1"] + recall) / 2,
    }
    return {"metrics": metrics, "details": details}


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
    mode: str  # "base" | "sft" | "ssr"
    model: str  # what is evaluated: a checkpoint dir, a model dir or an embedded name
    base: str  # the base model: its own answers are the reference of the drift
    out: Path  # eval files go to out/eval
    run_dir: Path | None
    cfg: Config


def _is_run_dir(p: Path) -> bool:
    """A run dir's config.json is an ssrengine config (sections), not an HF model config."""
    try:
        saved = json.loads((p / "config.json").read_text())
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
    from ssrengine.checkpoint import latest_checkpoint

    p = Path(target)
    if p.is_dir() and _is_run_dir(p):
        raw = json.loads((p / "config.json").read_text())
        for sec, values in parse_overrides(overrides or []).items():
            raw.setdefault(sec, {}).update(values)
        cfg = build_config(raw, source=str(p / "config.json"))
        ckpt = latest_checkpoint(p / "checkpoints")
        if ckpt is None:
            raise InputError(
                "no finished checkpoint; train the run first", file=str(p / "checkpoints")
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
    from ssrengine.models import EMBEDDED, resolve_model_path

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


@contextmanager
def _loaded(cfg: Config, path: str) -> Iterator[tuple[Any, Any, Any]]:
    """(generator, scoring model, tokenizer) for ``path``. The hf backend shares one model."""
    from ssrengine.models import load_model, load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    lm = load_model(
        path,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.generation.backend == "hf":
        from ssrengine.generation.hf import HFGenerator

        gen = HFGenerator(path, model=lm, tokenizer=tok, batch_size=cfg.generation.batch_size)
    else:
        from ssrengine.stages import open_generator

        gen = open_generator(replace(cfg, generation=replace(cfg.generation, model=path)))
    try:
        yield gen, lm, tok
    finally:
        gen.close()


def _generate(
    cfg: Config, out: Path, examples: list[Example], gen: Any, file: str, *, chat: bool
) -> dict[str, dict[str, Any]]:
    """Greedy answers into OUT/eval/<file> (resumable); rows by id."""
    from ssrengine.stages import generate_rows

    fn = None if chat else (lambda e: e.messages)  # probe prompts: no task instruction
    return generate_rows(cfg, out, examples, gen, file=f"{EVAL_DIR}/{file}", messages_fn=fn)


# ------------------------------------------------------------------------------ eval run
def _evaluate_splits(t: Target, opts: EvalOptions, gen: Any) -> dict[str, Any]:
    out = {}
    for name, spec in opts.splits:
        path = resolve_data_file(spec, t.cfg.data.seed)
        examples = load_examples(path, on_invalid=t.cfg.data.on_invalid, max_examples=opts.limit)
        rows = _generate(t.cfg, t.out, examples, gen, f"{name}.jsonl", chat=True)
        answers = {i: r["response"] for i, r in rows.items()}
        res = task_metrics(examples, answers)
        atomic_write_jsonl(t.out / EVAL_DIR / f"{name}_details.jsonl", res["details"])
        out[name] = {"data": spec, **res["metrics"]}
        m = res["metrics"]
        log.info(
            "%s: score %.1f  unanswerable F1 %.3f  answer recall %.3f  (n=%d)",
            name,
            m["score"],
            m["unanswerable"]["f1"],
            m["answer_recall"],
            m["n"],
        )
    return out


def self_vs_gold(t: Target, model: Any, tok: Any, limit: int) -> dict[str, Any] | None:
    """Paper Figure 1: per-token log-probability of gold vs the model's own training answers
    under the base model, for an SSR run that has generations.jsonl."""
    from ssrengine.retention import chat_sequences, score_sequences
    from ssrengine.stages import GENERATIONS, VERDICTS, train_examples

    if t.run_dir is None or not (t.run_dir / GENERATIONS).exists():
        return None
    gens = {r["id"]: r for r in read_rows(t.run_dir / GENERATIONS)}
    verdicts = (
        {r["id"]: r for r in read_rows(t.run_dir / VERDICTS)}
        if (t.run_dir / VERDICTS).exists()
        else {}
    )
    examples = [e for e in train_examples(t.cfg) if gens.get(e.id, {}).get("response", "").strip()]
    examples = examples[:limit] if limit else examples
    if not examples:
        return None
    prompts = [prompt_messages(e.messages, e.documents, t.cfg.data.system_prompt) for e in examples]
    gold = score_sequences(model, chat_sequences(tok, prompts, [e.response for e in examples]))
    own = score_sequences(
        model, chat_sequences(tok, prompts, [gens[e.id]["response"] for e in examples])
    )
    rows = [
        {
            "id": e.id,
            "unanswerable": gold_unanswerable(e),
            "accept": verdicts.get(e.id, {}).get("accept"),
            "gold_logprob": g[0] / max(g[1], 1),
            "own_logprob": o[0] / max(o[1], 1),
            "gold_tokens": g[1],
            "own_tokens": o[1],
        }
        for e, g, o in zip(examples, gold, own)
    ]
    res = {"model": t.base, "unit": "mean log-probability per answer token", "rows": rows}
    atomic_write_text(t.out / EVAL_DIR / SELF_VS_GOLD, json.dumps(res, indent=1) + "\n")
    return res


def _lm_eval(t: Target, opts: EvalOptions) -> dict[str, Any]:
    from ssrengine.models import pick_device, resolve_model_path
    from ssrengine.retention import MC_FILE, asset_path, lm_eval_available, run_lm_eval

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


def _seed_base_answers(out: Path, base_eval: str) -> None:
    """Start probe_base.jsonl from the base eval's rows. Rows are keyed by model + prompt +
    sampling, so rows made with other settings are simply not reused."""
    src = Path(base_eval) / EVAL_DIR / "probe_base.jsonl" if base_eval else None
    dst = out / EVAL_DIR / "probe_base.jsonl"
    if src is None or dst.exists() or src.resolve() == dst.resolve():
        return
    if not src.is_file():
        raise InputError("no probe answers of the base here; eval the base first", file=str(src))
    atomic_write_jsonl(dst, read_rows(src))


def retention_metrics(retention: dict[str, Any]) -> dict[str, float]:
    """The flat "higher is better" numbers whose relative drop vs base the report averages."""
    from ssrengine.retention import MC_TASK

    out = {
        "probe_acc": retention["probe"]["accuracy"],
        "mc_acc": retention["mc"]["acc"],
        "own_answer_prob": retention["own_answers"]["prob_per_token"],
    }
    for task, metrics in retention.get("lm_eval", {}).items():
        # The shipped multiple-choice set through lm-eval is a cross-check of mc_acc (the same
        # scoring): it is counted once.
        if isinstance(metrics, dict) and task != MC_TASK:
            for k, v in metrics.items():
                out[f"lm_eval:{task}/{k}"] = v
    return out


def run_eval(t: Target, opts: EvalOptions) -> dict[str, Any]:
    """Evaluate ``t``; write and return OUT/eval/eval.json."""
    from ssrengine.retention import (
        answer_token_sequences,
        load_mc,
        load_probe,
        mc_accuracy,
        own_answer_stats,
        probe_metrics,
        score_sequences,
    )

    t0 = time.perf_counter()
    (t.out / EVAL_DIR).mkdir(parents=True, exist_ok=True)
    probe = load_probe(opts.probe_file or None, opts.probe_limit)
    probe_ex = [p.example() for p in probe]
    probe_msgs = [e.messages for e in probe_ex]
    mc = load_mc(opts.mc_file or None, opts.mc_limit)
    same = t.model == t.base
    res: dict[str, Any] = {}

    def own_answer_scores(lm: Any, tok: Any, rows: dict[str, dict[str, Any]]) -> Any:
        # the exact greedy tokens the base model produced, after the same prompt tokens
        ids = [rows[e.id]["token_ids"] for e in probe_ex]
        return score_sequences(lm, answer_token_sequences(tok, probe_msgs, ids))

    def evaluate_with(gen: Any, lm: Any, tok: Any, base_rows: dict[str, Any], base_lp: Any) -> None:
        res["splits"] = _evaluate_splits(t, opts, gen)
        rows = (
            base_rows if same else _generate(t.cfg, t.out, probe_ex, gen, "probe.jsonl", chat=False)
        )
        answers = {i: r["response"] for i, r in rows.items()}
        lp = base_lp if same else own_answer_scores(lm, tok, base_rows)
        own, ref = own_answer_stats(lp), own_answer_stats(base_lp)
        own["drift_per_token"] = own["logprob_per_token"] - ref["logprob_per_token"]
        own["base_logprob_per_token"] = ref["logprob_per_token"]
        pm = probe_metrics(probe, answers)
        atomic_write_jsonl(
            t.out / EVAL_DIR / "probe_details.jsonl",
            [
                {"id": p.id, "category": p.category, "answer": answers[p.id],
                 "base_answer": base_rows[p.id]["response"], "correct": pm["correct"][p.id],
                 "logprob_base_answer": s / max(n, 1)}
                for p, (s, n) in zip(probe, lp)
            ],
        )  # fmt: skip
        pm.pop("correct")
        res["retention"] = {"probe": pm, "mc": mc_accuracy(lm, tok, mc), "own_answers": own}

    with _loaded(t.cfg, t.base) as (gen, lm, tok):
        _seed_base_answers(t.out, opts.base_eval)
        base_rows = _generate(t.cfg, t.out, probe_ex, gen, "probe_base.jsonl", chat=False)
        base_lp = own_answer_scores(lm, tok, base_rows)
        fig1 = self_vs_gold(t, lm, tok, opts.self_vs_gold_limit)
        if same:
            evaluate_with(gen, lm, tok, base_rows, base_lp)
    if not same:
        with _loaded(t.cfg, t.model) as (gen, lm, tok):
            evaluate_with(gen, lm, tok, base_rows, base_lp)
    res["retention"]["lm_eval"] = _lm_eval(t, opts)
    result = {
        "name": t.name,
        "kind": t.kind,
        "mode": t.mode,
        "model": t.model,
        "base": t.base,
        "run_dir": str(t.run_dir) if t.run_dir else None,
        **res,
        "retention_metrics": retention_metrics(res["retention"]),
        "self_vs_gold": fig1 is not None,
        "options": asdict(opts),
        "config": t.cfg.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(t.out / EVAL_DIR / EVAL_JSON, json.dumps(result, indent=2) + "\n")
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
    print(f"written: {t.out / EVAL_DIR / EVAL_JSON}")
    return 0


def summary_line(res: dict[str, Any]) -> str:
    parts = [f"{res['name']} ({res['mode']})"]
    for name, m in res["splits"].items():
        parts.append(f"{name} {m['score']:.1f}")
    parts += [f"{k} {v:.3f}" for k, v in res["retention_metrics"].items()]
    return "  ".join(parts)
