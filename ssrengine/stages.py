"""The data stages of a run: generate → judge → build. Each is resumable.

generate and judge append rows to JSONL files as batches complete and skip rows already
present, keyed by id + model + prompt hash (generate) or id + judge + candidate hash (judge),
so a killed stage resumes with nothing lost or duplicated. build writes rehearsal.jsonl whole,
atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ssrengine.config import Config
from ssrengine.data import Example, load_examples, prompt_messages, resolve_data_file
from ssrengine.errors import InputError
from ssrengine.generation import BackendError, Generator, Request, SamplingParams, make_generator
from ssrengine.io import RowWriter, atomic_write_jsonl, atomic_write_text, read_rows
from ssrengine.judge import Judge, LLMJudge, RuleJudge, Verdict

log = logging.getLogger(__name__)

GENERATIONS, PARAPHRASES = "generations.jsonl", "paraphrases.jsonl"
VERDICTS, PARAPHRASE_VERDICTS = "verdicts.jsonl", "paraphrase_verdicts.jsonl"
REHEARSAL, BUILD_STATS = "rehearsal.jsonl", "build_stats.json"


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def train_examples(cfg: Config) -> list[Example]:
    path = resolve_data_file(cfg.data.train_file, cfg.data.seed)
    return load_examples(path, on_invalid=cfg.data.on_invalid, max_examples=cfg.data.max_examples)


class _LazyGenerator(Generator):
    """Opens the backend on first use, so a finished stage never loads a model or starts a
    server; rows record the configured model name, a key that is stable across reruns."""

    def __init__(self, backend: str, model: str, open_fn: Callable[[], Generator]) -> None:
        self.backend, self.model, self._open, self._gen = backend, model, open_fn, None

    def _get(self) -> Generator:
        if self._gen is None:
            self._gen = self._open()
        return self._gen

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Any]:
        return self._get().generate(requests, sampling)

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        return self._get().tokenize(messages)

    def token_id(self, text: str) -> int:
        return self._get().token_id(text)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()


def open_generator(cfg: Config, *, for_judge: bool = False) -> Generator:
    g, j = cfg.generation, cfg.judge
    backend = (j.backend or g.backend) if for_judge else g.backend
    model = (j.model or g.model or cfg.model.path) if for_judge else (g.model or cfg.model.path)
    return _LazyGenerator(
        backend,
        model,
        lambda: make_generator(
            backend,
            model,
            url=(j.url or g.url) if for_judge else g.url,
            batch_size=j.batch_size if for_judge else g.batch_size,
            dtype=cfg.model.dtype,
            device=cfg.model.device,
            trust_remote_code=cfg.model.trust_remote_code,
            launch=g.launch,
            launch_python=g.launch_python,
            tp_size=g.tp_size,
            dp_size=g.dp_size,
            mem_fraction=g.mem_fraction,
            concurrency=g.concurrency,
            timeout_s=g.timeout_s,
            max_retries=g.max_retries,
        ),
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run_rows(
    path: Path,
    todo: list[Any],
    key: Callable[[dict[str, Any]], str],
    work: Callable[[Sequence[Any]], list[dict[str, Any]]],
    *,
    chunk: int,
    desc: str,
    total: int,
    server: str = "",
) -> dict[str, dict[str, Any]]:
    """Run ``work`` over ``todo`` in chunks, appending each chunk's rows as it completes."""
    with RowWriter(path, key=key) as out:
        done_before = total - len(todo)
        bar = tqdm(total=total, initial=done_before, desc=desc, unit="row", dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0
        try:
            for part in _chunks(todo, chunk):
                for row in work(part):
                    out.write(row)
                    tokens += len(row.get("token_ids", ()))
                bar.update(len(part))
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    rows_s=f"{(bar.n - done_before) / dt:.2f}", tok_s=f"{tokens / dt:.1f}"
                )
        except BackendError as e:
            raise BackendError(
                f"{e}; {len(out.rows)}/{total} rows are saved in {path} and a rerun resumes from there",
                server=e.server or server,
            ) from e
        finally:
            bar.close()
        return out.rows


def generate_rows(
    cfg: Config,
    run_dir: Path,
    examples: list[Example],
    generator: Generator,
    *,
    file: str = GENERATIONS,
    messages_fn: Callable[[Example], list[dict[str, str]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate an answer per example into ``run_dir/file``; returns rows by id (current key only)."""
    g = cfg.generation
    sampling = SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        seed=cfg.train.seed,
    )
    messages_fn = messages_fn or (
        lambda e: prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    )
    prompts = {e.id: messages_fn(e) for e in examples}
    hashes = {i: _hash([m, asdict(sampling)]) for i, m in prompts.items()}

    def key(r: dict[str, Any]) -> str:
        return f"{r['id']}|{r['model']}|{r['prompt_hash']}"

    def work(part: Sequence[Example]) -> list[dict[str, Any]]:
        outs = generator.generate([Request(messages=prompts[e.id]) for e in part], sampling)
        return [
            {
                "id": e.id,
                "response": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "backend": generator.backend,
                "model": generator.model,
                "prompt_hash": hashes[e.id],
            }
            for e, o in zip(part, outs)
        ]

    done = {key(r) for r in read_rows(run_dir / file)} if (run_dir / file).exists() else set()
    todo = [e for e in examples if f"{e.id}|{generator.model}|{hashes[e.id]}" not in done]
    # Local hf generates one batch at a time; server backends keep `concurrency` batches in flight.
    chunk = g.batch_size * (1 if generator.backend == "hf" else max(1, g.concurrency))
    rows = _run_rows(
        run_dir / file,
        todo,
        key,
        work,
        chunk=chunk,
        desc=file.split(".")[0],
        total=len(examples),
        server=g.url,
    )
    return {
        r["id"]: r
        for k, r in rows.items()
        if r["id"] in hashes and k == f"{r['id']}|{generator.model}|{hashes[r['id']]}"
    }


def judge_rows(
    cfg: Config,
    run_dir: Path,
    examples: list[Example],
    candidates: dict[str, str],
    judge: Judge,
    *,
    file: str = VERDICTS,
) -> dict[str, Verdict]:
    cand_hash = {e.id: _hash(candidates[e.id]) for e in examples}

    def key(r: dict[str, Any]) -> str:
        return f"{r['id']}|{r['judge']}|{r['candidate_hash']}"

    def work(part: Sequence[Example]) -> list[dict[str, Any]]:
        verdicts = judge.judge_batch(part, [candidates[e.id] for e in part])
        return [
            {
                "id": e.id,
                "accept": v.accept,
                "score": round(v.score, 6),
                "reason": v.reason,
                "judge": judge.name,
                "candidate_hash": cand_hash[e.id],
            }
            for e, v in zip(part, verdicts)
        ]

    done = {key(r) for r in read_rows(run_dir / file)} if (run_dir / file).exists() else set()
    todo = [e for e in examples if f"{e.id}|{judge.name}|{cand_hash[e.id]}" not in done]
    rows = _run_rows(
        run_dir / file,
        todo,
        key,
        work,
        chunk=max(1, cfg.judge.batch_size),
        desc=file.split(".")[0],
        total=len(examples),
    )
    return {
        r["id"]: Verdict(r["accept"], r["score"], r["reason"])
        for k, r in rows.items()
        if r["id"] in cand_hash and k == f"{r['id']}|{judge.name}|{cand_hash[r['id']]}"
    }


def make_judge(cfg: Config, generator: Generator | None = None) -> Judge:
    if cfg.judge.kind == "rule":
        return RuleJudge(cfg.judge.min_f1)
    if generator is None:
        raise InputError("judge.kind = llm needs a generator", field="judge.kind")
    return LLMJudge(generator, cfg.judge.threshold)


def paraphrase_messages(cfg: Config, e: Example) -> list[dict[str, str]]:
    """S3FT: ask the base model to restate the gold answer in its own words, conditioned on it."""
    msgs = prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    last = msgs[-1]
    ask = (
        f'{last["content"]}\n\nA correct answer is: "{e.response}"\n'
        "Answer the question yourself in your own words, consistent with that answer."
    )
    return msgs[:-1] + [{"role": "user", "content": ask}]


def run_generate(
    cfg: Config, run_dir: Path, examples: list[Example] | None = None
) -> dict[str, dict[str, Any]]:
    examples = examples if examples is not None else train_examples(cfg)
    with open_generator(cfg) as gen:
        return generate_rows(cfg, run_dir, examples, gen)


def _judge_with(cfg: Config, fn: Callable[[Judge, Generator | None], Any]) -> Any:
    if cfg.judge.kind == "rule":
        return fn(make_judge(cfg), None)
    with open_generator(cfg, for_judge=True) as gen:
        return fn(make_judge(cfg, gen), gen)


def run_judge(
    cfg: Config, run_dir: Path, examples: list[Example] | None = None
) -> dict[str, Verdict]:
    examples = examples if examples is not None else train_examples(cfg)
    gens = _stage_rows(run_dir / GENERATIONS, "generate")
    missing = [e.id for e in examples if e.id not in gens]
    if missing:
        raise InputError(
            f"no generation for {len(missing)} example(s) (first: {missing[0]!r}); run the generate stage first",
            file=str(run_dir / GENERATIONS),
        )
    cands = {e.id: gens[e.id]["response"] for e in examples}
    return _judge_with(cfg, lambda j, _: judge_rows(cfg, run_dir, examples, cands, j))


def run_paraphrase(cfg: Config, run_dir: Path, rejected: list[Example]) -> dict[str, Verdict]:
    """S3FT middle tier: paraphrase the gold answer for rejected examples, then judge the paraphrase."""
    with open_generator(cfg) as gen:
        rows = generate_rows(
            cfg,
            run_dir,
            rejected,
            gen,
            file=PARAPHRASES,
            messages_fn=lambda e: paraphrase_messages(cfg, e),
        )
    cands = {e.id: rows[e.id]["response"] for e in rejected}
    return _judge_with(
        cfg, lambda j, _: judge_rows(cfg, run_dir, rejected, cands, j, file=PARAPHRASE_VERDICTS)
    )


def _stage_rows(path: Path, stage: str) -> dict[str, dict[str, Any]]:
    """Latest row per id of a finished stage file (later rows win: they match the newest key)."""
    if not path.exists():
        raise InputError(f"missing; run the {stage} stage first", file=str(path))
    return {r["id"]: r for r in read_rows(path)}


def run_build(cfg: Config, run_dir: Path, examples: list[Example] | None = None) -> dict[str, Any]:
    """R (accepted own answers) + paraphrases + G (gold) → rehearsal.jsonl and build_stats.json."""
    examples = examples if examples is not None else train_examples(cfg)
    targets: dict[str, tuple[str, str]] = {e.id: (e.response, "gold") for e in examples}
    if cfg.run.mode == "ssr":
        gens = _stage_rows(run_dir / GENERATIONS, "generate")
        verdicts = _stage_rows(run_dir / VERDICTS, "judge")
        for e in examples:
            if e.id not in gens or e.id not in verdicts:
                raise InputError(
                    f"example {e.id!r} has no generation or verdict; run generate and judge first",
                    file=str(run_dir / VERDICTS),
                )
            if verdicts[e.id]["accept"] and gens[e.id]["response"].strip():
                targets[e.id] = (gens[e.id]["response"], "self")
        rejected = [e for e in examples if targets[e.id][1] == "gold"]
        if cfg.judge.paraphrase and rejected:
            para = _stage_rows(run_dir / PARAPHRASES, "paraphrase")
            pverd = _stage_rows(run_dir / PARAPHRASE_VERDICTS, "paraphrase judge")
            for e in rejected:
                if e.id in pverd and pverd[e.id]["accept"] and para[e.id]["response"].strip():
                    targets[e.id] = (para[e.id]["response"], "paraphrase")
    rows = [
        {
            "id": e.id,
            "messages": e.messages,
            "documents": e.documents,
            "target": targets[e.id][0],
            "source": targets[e.id][1],
            "answerable": e.answerable,
        }
        for e in examples
    ]
    stats = build_stats(rows)
    atomic_write_jsonl(run_dir / REHEARSAL, rows)
    atomic_write_text(run_dir / BUILD_STATS, json.dumps(stats, indent=2) + "\n")
    return stats


def build_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def share(sub: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(sub)
        counts = {s: sum(r["source"] == s for r in sub) for s in ("self", "paraphrase", "gold")}
        return {"n": n, **counts, "R_share": round(counts["self"] / n, 4) if n else 0.0}

    return {
        "overall": share(rows),
        "answerable": share([r for r in rows if r.get("answerable") is True]),
        "unanswerable": share([r for r in rows if r.get("answerable") is False]),
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = []
    for k, s in stats.items():
        if s["n"]:
            lines.append(
                f"  {k:<13} n={s['n']:<5} R (self)={s['self']:<5} paraphrase={s['paraphrase']:<5} "
                f"G (gold)={s['gold']:<5} R share={s['R_share']:.1%}"
            )
    return "\n".join(lines)
