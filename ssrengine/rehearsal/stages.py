"""The data stages of a run: prepare → generate → judge → build. Each is resumable.

prepare validates the training records and fits them to data.max_seq_len once; every later
stage renders the prompt of those fitted examples. generate and judge append rows to JSONL
files as batches complete and skip rows already present under their resume key
(`ssrengine.core.rundir`: a key covers everything the row depends on), so a killed stage resumes
with nothing lost or duplicated and an edited input is recomputed. judge and build read only
the rows of the current keys, never a row another setting made. build writes rehearsal.jsonl
and build_stats.json whole, atomically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.io import RowWriter
from ssrengine.core.rows import content_hash, read_typed
from ssrengine.core.rundir import (
    GenerationRow,
    RunDir,
    VerdictRow,
    generation_key,
    verdict_key,
)
from ssrengine.core.urls import redact
from ssrengine.data.records import Example, prompt_messages
from ssrengine.generation import (
    BackendError,
    Generator,
    Request,
    SamplingParams,
    generation_config,
    make_generator,
)
from ssrengine.generation.base import model_name
from ssrengine.rehearsal import prefix_tier
from ssrengine.rehearsal.judge import (
    Judge,
    Verdict,
    make_judge,
    paraphrase_instruction,
    paraphrase_judge,
)
from ssrengine.rehearsal.prepare import prepare

log = logging.getLogger(__name__)


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
    gen = generation_config(cfg, for_judge=for_judge)
    own = for_judge and cfg.judge.model not in ("", cfg.model.path)  # keeps its own template
    model = replace(cfg.model, chat_template="") if own else cfg.model
    return _LazyGenerator(gen.backend, gen.model, lambda: make_generator(model, gen))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


K = TypeVar("K", GenerationRow, VerdictRow)


def _run_rows(
    path: Path,
    cls: type[K],
    examples: list[Example],
    want: Callable[[Example], str],
    work: Callable[[Sequence[Example]], list[K]],
    *,
    chunk: int,
    server: str = "",
) -> dict[str, K]:
    """The row of key ``want(e)`` for every example, by id: rows already in ``path`` are
    reused, the rest computed by ``work`` in chunks and appended as each chunk completes."""
    have = {r.key(): r for r in read_typed(path, cls)} if path.exists() else {}
    todo = [e for e in examples if want(e) not in have]
    total = len(examples)
    with RowWriter(path, key=lambda d: cls.from_json(d, str(path)).key()) as out:
        done_before = total - len(todo)
        bar = tqdm(total=total, initial=done_before, desc=path.stem, unit="row", dynamic_ncols=True)
        t0, tokens, saved = time.perf_counter(), 0, done_before
        try:
            for part in _chunks(todo, chunk):
                for row in work(part):
                    out.write(row.to_json())
                    have[row.key()] = row
                    tokens += len(row.token_ids) if isinstance(row, GenerationRow) else 0
                saved += len(part)
                bar.update(len(part))
                dt = max(time.perf_counter() - t0, 1e-9)
                rate = {"rows_s": f"{(bar.n - done_before) / dt:.2f}"}
                if cls is GenerationRow:  # verdict rows have no tokens: no meaningless tok_s=0
                    rate["tok_s"] = f"{tokens / dt:.1f}"
                bar.set_postfix(rate)
        except BackendError as e:
            raise BackendError(
                f"{e}; {saved}/{total} rows are saved in {path} and a rerun resumes from there",
                server=e.server or server,
            ) from e
        finally:
            bar.close()
    return {e.id: have[want(e)] for e in examples}


def _sampling(cfg: Config, sample: int = 0) -> SamplingParams:
    """Sample ``i`` of generation.num_samples draws with seed train.seed + i: every backend
    that takes a seed (hf: one torch.Generator per prompt; openai: the request's ``seed``) gives
    a different, reproducible answer per index."""
    g = cfg.generation
    return SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        seed=cfg.train.seed + sample,
    )


MessagesFn = Callable[[Example], list[dict[str, str]]]
IdsFn = Callable[[Example], list[int]]


def prompt_hashes(
    cfg: Config,
    examples: list[Example],
    generator: Generator,
    messages_fn: MessagesFn | None = None,
    ids_fn: IdsFn | None = None,
    sample: int = 0,
) -> dict[str, str]:
    """Each example's `GenerationRow.prompt_hash` under ``cfg``, by id: everything the answer
    depends on besides the model (prompt, sampling with the sample's seed, backend, dtype)."""
    messages_fn = messages_fn or (
        lambda e: prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    )
    prompt = ids_fn or messages_fn
    sampling = asdict(_sampling(cfg, sample))
    return {
        e.id: content_hash([prompt(e), sampling, generator.backend, cfg.model.dtype])
        for e in examples
    }


def generation_keys(
    cfg: Config,
    examples: list[Example],
    generator: Generator,
    messages_fn: MessagesFn | None = None,
    ids_fn: IdsFn | None = None,
    sample: int = 0,
) -> dict[str, str]:
    """The resume key of each example's generation (sample ``sample``) under ``cfg``, by id.
    Reads only the generator's names: a lazy generator (`open_generator`) loads no model for
    it. ``ids_fn``: prompts given as token ids (they replace the messages in the key)."""
    hashes = prompt_hashes(cfg, examples, generator, messages_fn, ids_fn, sample)
    return _keys(hashes, generator.model, sample)


def _keys(hashes: dict[str, str], model: str, sample: int) -> dict[str, str]:
    return {i: generation_key(i, model, h, sample or None) for i, h in hashes.items()}


def generate_rows(
    cfg: Config,
    run_dir: Path,
    examples: list[Example],
    generator: Generator,
    *,
    path: Path | None = None,
    messages_fn: MessagesFn | None = None,
    ids_fn: IdsFn | None = None,
    sample: int = 0,
) -> dict[str, GenerationRow]:
    """Generate an answer per example into ``path`` (default: the run's generations.jsonl);
    returns the rows of the current key by id. ``ids_fn``: prompts as token ids instead of
    chat messages (e.g. a prompt with the start of the answer forced). ``sample``: which of
    generation.num_samples answers (its own seed and key)."""
    path = path or RunDir(run_dir).generations
    g = cfg.generation
    sampling = _sampling(cfg, sample)
    messages_fn = messages_fn or (
        lambda e: prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    )
    prompts = {e.id: messages_fn(e) for e in examples}
    ids = {e.id: ids_fn(e) for e in examples} if ids_fn else None
    hashes = prompt_hashes(cfg, examples, generator, messages_fn, ids_fn, sample)
    keys = _keys(hashes, generator.model, sample)

    def request(i: str) -> Request:
        return Request(input_ids=ids[i]) if ids else Request(messages=prompts[i])

    def work(part: Sequence[Example]) -> list[GenerationRow]:
        outs = generator.generate([request(e.id) for e in part], sampling)
        return [
            GenerationRow(
                id=e.id,
                response=o.text,
                token_ids=o.token_ids,
                finish_reason=o.finish_reason,
                backend=generator.backend,
                model=generator.model,
                prompt_hash=hashes[e.id],
                sample=sample or None,
            )
            for e, o in zip(part, outs)
        ]

    # Local hf generates one batch at a time; server backends keep `concurrency` batches in flight.
    chunk = g.batch_size * (1 if generator.backend == "hf" else max(1, g.concurrency))
    return _run_rows(
        path,
        GenerationRow,
        examples,
        lambda e: keys[e.id],
        work,
        chunk=chunk,
        server=redact(g.url),
    )


def verdict_input_hash(example: Example, candidate: str) -> str:
    """What a verdict depends on besides the judge: documents, conversation, gold answer,
    answerable label and the candidate."""
    return content_hash([example.to_record(), candidate])


def judge_rows(
    cfg: Config,
    run_dir: Path,
    examples: list[Example],
    candidates: dict[str, str],
    judge: Judge,
    *,
    path: Path | None = None,
) -> dict[str, Verdict]:
    """Judge each example's candidate into ``path`` (default: the run's verdicts.jsonl)."""
    path = path or RunDir(run_dir).verdicts
    inputs = {e.id: verdict_input_hash(e, candidates[e.id]) for e in examples}

    def work(part: Sequence[Example]) -> list[VerdictRow]:
        verdicts = judge.judge_batch(part, [candidates[e.id] for e in part])
        for e, v in zip(part, verdicts):
            if not math.isfinite(v.score):  # a stored verdict is reused forever: never a NaN
                raise InputError(
                    f"judge {judge.name} gave {e.id!r} the score {v.score!r}, not a finite "
                    "number; not stored (the verdicts before it are)",
                    file=str(path),
                )
        return [
            VerdictRow(
                id=e.id,
                accept=v.accept,
                score=round(v.score, 6),
                reason=v.reason,
                judge=judge.name,
                input_hash=inputs[e.id],
            )
            for e, v in zip(part, verdicts)
        ]

    rows = _run_rows(
        path,
        VerdictRow,
        examples,
        lambda e: verdict_key(e.id, judge.name, inputs[e.id]),
        work,
        chunk=max(1, cfg.judge.batch_size),
    )
    return {i: Verdict(r.accept, r.score, r.reason) for i, r in rows.items()}


def paraphrase_messages(cfg: Config, e: Example) -> list[dict[str, str]]:
    """S3FT: ask the base model to restate the gold answer in its own words, conditioned on it."""
    msgs = prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
    ask = paraphrase_instruction(msgs[-1]["content"], e.response)
    return msgs[:-1] + [{"role": "user", "content": ask}]


def run_generate(
    cfg: Config, run_dir: Path, examples: list[Example] | None = None
) -> dict[str, GenerationRow]:
    """generation.num_samples answers per example into generations.jsonl, sample by sample;
    returns sample 0's rows by id (`current_samples` reads them all)."""
    examples = examples if examples is not None else prepare(cfg)
    with open_generator(cfg) as gen:
        first = generate_rows(cfg, run_dir, examples, gen)
        for sample in range(1, cfg.generation.num_samples):
            generate_rows(cfg, run_dir, examples, gen, sample=sample)
    return first


T = TypeVar("T")


def _judge_with(cfg: Config, fn: Callable[[Judge], T]) -> T:
    if cfg.judge.kind == "rule":
        return fn(make_judge(cfg))
    with open_generator(cfg, for_judge=True) as gen:
        return fn(make_judge(cfg, gen))


def current_generations(
    cfg: Config,
    run_dir: Path,
    examples: list[Example],
    *,
    paraphrases: bool = False,
    sample: int = 0,
) -> dict[str, GenerationRow]:
    """Each example's generation (or S3FT paraphrase) made under ``cfg``, by id. Rows of other
    settings in the file are never picked: a missing one says to run the stage that makes it."""
    rd = RunDir(run_dir)
    path, stage = (rd.paraphrases, "judge") if paraphrases else (rd.generations, "generate")
    fn = (lambda e: paraphrase_messages(cfg, e)) if paraphrases else None
    keys = generation_keys(cfg, examples, open_generator(cfg), fn, sample=sample)
    return _current(path, GenerationRow, keys, stage)


def current_samples(
    cfg: Config, run_dir: Path, examples: list[Example]
) -> list[dict[str, GenerationRow]]:
    """The generation.num_samples generations of each example under ``cfg``, in sample order."""
    return [
        current_generations(cfg, run_dir, examples, sample=s)
        for s in range(cfg.generation.num_samples)
    ]


V = TypeVar("V", Verdict, VerdictRow)


def first_accepted(
    examples: list[Example],
    samples: list[dict[str, GenerationRow]],
    verdicts_of: Callable[[list[Example], dict[str, GenerationRow]], dict[str, V]],
) -> dict[str, tuple[int, V]]:
    """Each example's chosen sample and its verdict: the first accepted non-empty answer in
    sample order, else sample 0 (rejected). ``verdicts_of(todo, gens)`` judges (or reads the
    verdicts of) one sample's answers; a sample is judged only for examples no earlier sample
    answered acceptably, so the judge stage and build ask for the same verdicts."""
    chosen: dict[str, tuple[int, V]] = {}
    todo = examples
    for s, gens in enumerate(samples):
        if not todo:
            break
        verdicts = verdicts_of(todo, gens)
        left = []
        for e in todo:
            v = verdicts[e.id]
            if v.accept and gens[e.id].response.strip():
                chosen[e.id] = (s, v)
                continue
            chosen.setdefault(e.id, (s, v))
            left.append(e)
        todo = left  # sample 0's verdict stays with an example no sample answered acceptably
    return chosen


def _current(path: Path, cls: type[K], keys: dict[str, str], stage: str) -> dict[str, K]:
    """The rows of ``keys`` (id -> resume key) from a stage's file, by id."""
    have = {r.key(): r for r in read_typed(path, cls)} if path.exists() else {}
    missing = [i for i, k in keys.items() if k not in have]
    if missing:
        raise InputError(
            f"no row under the current settings for {len(missing)} example(s) "
            f"(first: {missing[0]!r}); run the {stage} stage again",
            file=str(path),
        )
    return {i: have[k] for i, k in keys.items()}


def run_judge(
    cfg: Config, run_dir: Path, examples: list[Example] | None = None
) -> dict[str, Verdict]:
    """The judge's verdict per example, by id: on the first accepted of its
    generation.num_samples answers (`first_accepted`), else on sample 0's."""
    examples = examples if examples is not None else prepare(cfg)
    samples = current_samples(cfg, run_dir, examples)

    def judged(j: Judge) -> dict[str, Verdict]:
        def verdicts_of(todo: list[Example], gens: dict[str, GenerationRow]) -> dict[str, Verdict]:
            cands = {e.id: gens[e.id].response for e in todo}
            return judge_rows(cfg, run_dir, todo, cands, j)

        return {i: v for i, (_, v) in first_accepted(examples, samples, verdicts_of).items()}

    return _judge_with(cfg, judged)


def run_paraphrase(cfg: Config, run_dir: Path, rejected: list[Example]) -> dict[str, Verdict]:
    """S3FT middle tier: paraphrase the gold answer for rejected examples, then judge the paraphrase."""
    rd = RunDir(run_dir)
    with open_generator(cfg) as gen:
        rows = generate_rows(
            cfg,
            run_dir,
            rejected,
            gen,
            path=rd.paraphrases,
            messages_fn=lambda e: paraphrase_messages(cfg, e),
        )
    cands = {e.id: rows[e.id].response for e in rejected}
    return _judge_with(
        cfg,
        lambda j: judge_rows(
            cfg, run_dir, rejected, cands, paraphrase_judge(cfg, j), path=rd.paraphrase_verdicts
        ),
    )


def current_verdicts(
    cfg: Config,
    path: Path,
    examples: list[Example],
    gens: dict[str, GenerationRow],
    *,
    paraphrases: bool = False,
) -> dict[str, VerdictRow]:
    """The verdict of the configured judge (``paraphrases``: the paraphrase tier's,
    `paraphrase_judge`) on exactly each example and its generation."""
    judge = make_judge(cfg, open_generator(cfg, for_judge=True))  # names only: nothing loads
    judge = paraphrase_judge(cfg, judge) if paraphrases else judge
    keys = {
        e.id: verdict_key(e.id, judge.name, verdict_input_hash(e, gens[e.id].response))
        for e in examples
    }
    return _current(path, VerdictRow, keys, "judge")


def prefix_tokenizer(cfg: Config) -> Any:
    """The generating model's tokenizer: it encodes the forced prefixes and decodes them with
    their continuations (`ssrengine.rehearsal.prefix_tier`)."""
    from ssrengine.models.loading import load_tokenizer  # torch: only where the tier is on

    return load_tokenizer(
        model_name(cfg.model, cfg.generation), trust_remote_code=cfg.model.trust_remote_code
    )


def run_prefix(cfg: Config, run_dir: Path, rejected: list[Example]) -> dict[str, Verdict]:
    """Gold decision, own words (`ssrengine.rehearsal.prefix_tier`): the base model continues the forced
    gold decision for every rejected example; the candidates are judged."""
    rd = RunDir(run_dir)
    tok = prefix_tokenizer(cfg)
    with open_generator(cfg) as gen:
        rows = generate_rows(
            cfg,
            run_dir,
            rejected,
            gen,
            path=rd.prefixes,
            ids_fn=lambda e: prefix_tier.prompt_ids(tok, cfg, e),
        )
    cands = {e.id: prefix_tier.row_candidate(tok, e, rows[e.id]) for e in rejected}
    return _judge_with(
        cfg, lambda j: judge_rows(cfg, run_dir, rejected, cands, j, path=rd.prefix_verdicts)
    )
