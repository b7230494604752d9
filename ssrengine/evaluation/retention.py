"""Retention of general ability: the shipped probe, log-likelihood scoring and lm-eval.

Three offline measures, all "higher is better" and all compared with the base model:

- **probe accuracy** — general prompts outside the fine-tuning task (capitals, arithmetic,
  word tasks, short instructions; ``assets/retention_probe.jsonl``). The model answers greedily;
  an answer is correct when it contains every token of one accepted alias.
- **multiple-choice accuracy** — ``assets/retention_mc.jsonl``, scored the way lm-eval scores
  MMLU/HellaSwag: argmax over choices of log p(" " + choice | question). The same file runs as
  a local lm-eval task (`local_task_yaml`) where lm-eval is installed.
- **own-answer likelihood** — the base model's own greedy answers to the probe (the exact
  generated tokens), scored under the evaluated model: per-token log-probability and its drift
  from the base model's. Training on another style of answers moves probability mass away from
  what the model used to say; the SSR paper's argument (Figure 1) in one number.

`score_sequences` is the one place log-likelihoods are computed: packed sequences through
`hidden_and_head` and the no-grad scorer of `ssrengine.kernels` (never the [N, V] logits).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.errors import InputError
from ssrengine.core.io import iter_jsonl
from ssrengine.data.records import IGNORE_INDEX, Example, encode, encode_prompt
from ssrengine.rehearsal.judge import token_recall

PROBE_FILE = "retention_probe.jsonl"
MC_FILE = "retention_mc.jsonl"
MC_TASK = "ssr_retention_mc"  # the shipped multiple-choice set as an lm-eval task


def asset_path(name: str) -> Path:
    """A data file shipped in ``ssrengine/assets`` (package data)."""
    return Path(str(resources.files("ssrengine").joinpath("assets", name)))


# ----------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class ProbeItem:
    id: str
    prompt: str
    reference: str
    accept: tuple[str, ...]  # any one of these, all its tokens present, makes an answer correct
    category: str = ""

    def example(self) -> Example:
        return Example(
            id=self.id, messages=[{"role": "user", "content": self.prompt}], response=self.reference
        )


def load_probe(path: str | Path | None = None, limit: int = 0) -> list[ProbeItem]:
    """Probe prompts: ``{id, prompt, reference, accept: [alias, ...], category?}`` per line."""
    path = Path(path) if path else asset_path(PROBE_FILE)
    items = []
    for line, obj in iter_jsonl(path):
        for key in ("id", "prompt", "reference"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise InputError("missing or empty string", file=str(path), line=line, field=key)
        accept = obj.get("accept") or [obj["reference"]]
        if not isinstance(accept, list) or not all(isinstance(a, str) for a in accept):
            raise InputError(
                "expected a list of strings", file=str(path), line=line, field="accept"
            )
        items.append(
            ProbeItem(
                obj["id"], obj["prompt"], obj["reference"], tuple(accept), obj.get("category", "")
            )
        )
        if limit and len(items) >= limit:
            break
    return items


def probe_correct(answer: str, accept: Sequence[str]) -> bool:
    """Correct when every (normalized) token of some accepted alias appears in the answer."""
    return any(token_recall(answer, a) == 1.0 for a in accept)


def probe_metrics(items: Sequence[ProbeItem], answers: dict[str, str]) -> dict[str, Any]:
    correct = {it.id: probe_correct(answers[it.id], it.accept) for it in items}
    by_cat: dict[str, list[bool]] = {}
    for it in items:
        by_cat.setdefault(it.category or "other", []).append(correct[it.id])
    return {
        "accuracy": sum(correct.values()) / max(len(items), 1),
        "n": len(items),
        "by_category": {c: round(sum(v) / len(v), 4) for c, v in sorted(by_cat.items())},
        "correct": correct,
    }


# ----------------------------------------------------------------------- multiple choice
@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


def load_mc(path: str | Path | None = None, limit: int = 0) -> list[MCItem]:
    """Multiple-choice items ``{id, question, choices: [...], answer: index}`` (lm-eval's shape)."""
    path = Path(path) if path else asset_path(MC_FILE)
    items = []
    for line, obj in iter_jsonl(path):
        ch, ans = obj.get("choices"), obj.get("answer")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise InputError(
                "expected a list of >= 2 strings", file=str(path), line=line, field="choices"
            )
        if not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise InputError(
                f"expected an index into choices, got {ans!r}",
                file=str(path),
                line=line,
                field="answer",
            )
        items.append(MCItem(str(obj.get("id", line)), str(obj["question"]), tuple(ch), ans))
        if limit and len(items) >= limit:
            break
    return items


def mc_sequences(tokenizer: Any, item: MCItem) -> list[tuple[list[int], list[int]]]:
    """One (input_ids, labels) per choice, encoded as lm-eval does for causal models: no special
    tokens, the context encoded alone, the continuation = the tail of encode(context + " " + choice)."""
    ctx = tokenizer(item.question, add_special_tokens=False)["input_ids"]
    out = []
    for choice in item.choices:
        whole = tokenizer(f"{item.question} {choice}", add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx) :]
        out.append((ctx + cont, [IGNORE_INDEX] * len(ctx) + cont))
    return out


def mc_accuracy(model: Any, tokenizer: Any, items: Sequence[MCItem]) -> dict[str, Any]:
    """lm-eval's ``acc`` (argmax log-likelihood) and ``acc_norm`` (divided by choice length in
    characters) on ``items``; ``correct``: per item, whether its argmax is the answer."""
    seqs, owner = [], []
    for k, it in enumerate(items):
        for s in mc_sequences(tokenizer, it):
            seqs.append(s)
            owner.append(k)
    scores = score_sequences(model, seqs)
    ll: list[list[float]] = [[] for _ in items]
    for k, (lp, _) in zip(owner, scores):
        ll[k].append(lp)
    acc = [max(range(len(v)), key=v.__getitem__) == it.answer for it, v in zip(items, ll)]
    norm = [
        max(range(len(v)), key=lambda j, v=v, it=it: v[j] / max(len(it.choices[j]), 1)) == it.answer
        for it, v in zip(items, ll)
    ]
    n = max(len(items), 1)
    return {"acc": sum(acc) / n, "acc_norm": sum(norm) / n, "n": len(items), "correct": acc}


# ----------------------------------------------------------------------------- scoring
def chat_sequences(
    tokenizer: Any, prompts: Sequence[list[dict[str, str]]], answers: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of chat prompts + assistant answers, labels on the answer only."""
    return [encode(tokenizer, m, a) for m, a in zip(prompts, answers)]


def answer_token_sequences(
    tokenizer: Any, prompts: Sequence[list[dict[str, str]]], answer_ids: Sequence[Sequence[int]]
) -> list[tuple[list[int], list[int]]]:
    """Chat prompts + exact generated answer tokens (as a backend returned them; no end-of-turn
    is added, so a truncated answer is scored as it was produced), labels on the answer only."""
    out = []
    for m, a in zip(prompts, answer_ids):
        p = encode_prompt(tokenizer, m)
        out.append((p + list(a), [IGNORE_INDEX] * len(p) + list(a)))
    return out


@torch.no_grad()
def score_sequences(
    model: Any, sequences: Sequence[tuple[list[int], list[int]]], *, max_tokens: int = 2048
) -> list[tuple[float, int]]:
    """(sum of log p, number of) supervised tokens per sequence, labels unshifted as
    `ssrengine.data.records.encode` returns them. Sequences are packed into rows of ``max_tokens``
    (raised to the longest one) and scored without building [tokens, vocab] logits."""
    from ssrengine.kernels import sequence_log_likelihood
    from ssrengine.models import precision
    from ssrengine.models.loading import head_bias_and_softcap, hidden_and_head
    from ssrengine.models.packing import model_inputs, pack

    if not sequences:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    budget = max(max_tokens, max(len(ids) for ids, _ in sequences))
    names = [str(i) for i in range(len(sequences))]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for batch in pack(list(sequences), budget, ids=names):
        b = batch.to(device)
        kw = model_inputs(b, attn)
        # bf16 autocast over fp32 weights on a GPU with bf16 (training's auto), the lm_head
        # product included: the scorer accumulates in fp32 itself, and an fp32 copy of a
        # 16-bit lm_head per batch would move its product off tensor cores.
        with precision.model_autocast(model):
            hidden, weight = hidden_and_head(model, kw.pop("input_ids"), **kw)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
            bias, softcap = head_bias_and_softcap(model)  # the rest of the model's logits
            s = sequence_log_likelihood(
                hidden, weight, b.labels, b.cu_seqlens, bias=bias, softcap=softcap
            )
        for name, lp, n in zip(batch.ids, s.logprob_sum.tolist(), s.num_tokens.tolist()):
            out[int(name)] = (float(lp), int(n))
    model.train(was_training)
    return out


def own_answer_stats(scores: Sequence[tuple[float, int]]) -> dict[str, float]:
    """Token-weighted mean log-probability and its per-token probability exp(mean)."""
    total, n = sum(s for s, _ in scores), sum(k for _, k in scores)
    mean = total / max(n, 1)
    return {"logprob_per_token": mean, "prob_per_token": math.exp(mean), "tokens": n}


# ------------------------------------------------------------------------------- lm-eval
def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def local_task_yaml(jsonl: str | Path, name: str) -> str:
    """An lm-eval task over a local JSONL of ``{question, choices, answer}`` (no hub access):
    log-likelihood multiple choice, acc and acc_norm, context = the question."""
    path = Path(jsonl).resolve()
    return "\n".join(
        [
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(path))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: question",
            "doc_to_choice: choices",
            "doc_to_target: answer",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "",
        ]
    )


def local_task_name(path: str | Path) -> str:
    stem = Path(path).stem.replace("-", "_").replace(".", "_")
    return MC_TASK if Path(path).name == MC_FILE else f"local_{stem}"


def lm_eval_dtype(dtype: str, device: str) -> str:
    """The weights lm-eval loads (it has no autocast): bf16 for fp32 weights on a GPU with
    bf16, as the rest of eval computes there (`ssrengine.models.precision`)."""
    from ssrengine.models import precision

    dev = torch.device(device)
    if dtype == "float32" and precision.inference_dtype(torch.float32, precision.capability(dev)) == "bfloat16":  # fmt: skip
        return "bfloat16"
    return dtype


def run_lm_eval(
    model_path: str,
    *,
    tasks: Sequence[str] = (),
    local_files: Sequence[str | Path] = (),
    limit: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[str, float]]:
    """lm-eval-harness on ``tasks`` (hub tasks: MMLU, TruthfulQA... on machines that reach the
    hub) plus a local task per JSONL in ``local_files``. Returns {task: {metric: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    dtype = lm_eval_dtype(dtype, device)

    names = list(tasks)
    with tempfile.TemporaryDirectory(prefix="ssr-lmeval-") as tmp:
        for f in local_files:
            name = local_task_name(f)
            (Path(tmp) / f"{name}.yaml").write_text(local_task_yaml(f, name))
            names.append(name)
        if not names:
            return {}
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_path},dtype={dtype}",
            tasks=names,
            task_manager=TaskManager(include_path=tmp),
            limit=limit or None,
            batch_size=batch_size,
            device=device,
            log_samples=False,
        )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        vals = {}
        for key, v in metrics.items():
            metric, sep, _ = key.partition(",")  # metrics are "acc,none"; "alias" etc. are not
            if sep and isinstance(v, (int, float)) and not metric.endswith("_stderr"):
                vals[metric] = float(v)
        out[task] = vals
    return out
