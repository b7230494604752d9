"""Typed run configuration: one frozen dataclass per section, filled from TOML + overrides.

Every field carries its documentation in ``metadata["doc"]``; the README's key table is
generated from it (``python -m ssrengine config --markdown``), so code and docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ssrengine.errors import InputError


def _f(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str = _f(
        "smollm2-135m",
        "Embedded model name (`smollm2-135m`, fetched on first use) or a local Hugging Face model directory.",
    )
    dtype: str = _f(
        "float32",
        "Parameter dtype when loading. Train in float32 on CPU (bf16 is slow without AMX).",
        ("float32", "bfloat16", "float16"),
    )
    attn_implementation: str = _f(
        "auto",
        "`auto`: flash_attention_2 on CUDA when flash-attn is installed, else sdpa_varlen "
        "(packed rows as one SDPA call per example; plain sdpa for padded batches).",
        ("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"),
    )
    trust_remote_code: bool = _f(
        False, "Allow custom modeling code shipped with the model directory."
    )
    device: str = _f("auto", "`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`...")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_file: str = _f(
        "builtin:train",
        "Training JSONL (the README's record format) or `builtin:SPLIT` for the embedded generator (train, validation, test, ood).",
    )
    max_examples: int = _f(0, "Use only the first N training examples (0 = all).")
    max_seq_len: int = _f(1024, "Longest prompt + target in tokens.")
    on_invalid: str = _f(
        "error",
        "A malformed record: stop with an error naming file, line and field, or skip it and count.",
        ("error", "skip"),
    )
    on_overlong: str = _f(
        "error",
        "An example longer than data.max_seq_len: error, drop documents from the end until it fits, or skip and count. A target is never cut.",
        ("error", "trim_documents", "skip"),
    )
    system_prompt: str = _f(
        "Answer the question using only the documents. If the documents do not contain the answer, say so.",
        "Instruction placed before the documents in the system message.",
    )
    seed: int = _f(0, "Seed of the embedded dataset generator.")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    backend: str = _f("hf", "Generation backend.", ("hf", "sglang", "sglang-http", "openai"))
    model: str = _f("", "Model for generation; empty = model.path.")
    max_new_tokens: int = _f(96, "Longest generated answer.")
    temperature: float = _f(0.0, "0 = greedy (the paper's setting).")
    top_p: float = _f(1.0, "Nucleus sampling mass (temperature > 0 only).")
    batch_size: int = _f(16, "Prompts per backend call (hf: per forward batch, length-sorted).")
    url: str = _f(
        "", "Server base URL(s) for sglang-http / openai, comma-separated for round-robin."
    )
    launch: bool = _f(
        False,
        "sglang-http: start `python -m sglang.launch_server` for generation.model and stop it at exit.",
    )
    tp_size: int = _f(1, "SGLang tensor-parallel size.")
    dp_size: int = _f(1, "SGLang data-parallel size.")
    mem_fraction: float = _f(0.85, "SGLang static memory fraction.")
    concurrency: int = _f(4, "HTTP backends: batches in flight at once.")
    timeout_s: float = _f(120.0, "HTTP backends: per-request timeout.")
    max_retries: int = _f(5, "HTTP backends: retries with exponential backoff before giving up.")


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    kind: str = _f(
        "rule",
        "`rule`: refusal agreement + answer token-F1; `llm`: P(Yes) from one step of next-token logprobs.",
        ("rule", "llm"),
    )
    threshold: float = _f(0.5, "LLM judge: accept when P(Yes)/(P(Yes)+P(No)) >= threshold.")
    min_f1: float = _f(
        0.3,
        "Rule judge: accept an answer when its token F1 against the gold answer is >= min_f1 "
        "and it contains every number of the gold answer.",
    )
    model: str = _f("", "LLM judge model; empty = model.path.")
    backend: str = _f(
        "",
        "LLM judge backend; empty = generation.backend.",
        ("", "hf", "sglang", "sglang-http", "openai"),
    )
    url: str = _f("", "LLM judge server URL(s); empty = generation.url.")
    batch_size: int = _f(16, "Examples per judge call.")
    paraphrase: bool = _f(
        False,
        "S3FT tier: for rejected answers, the base model paraphrases the gold answer; an accepted paraphrase becomes the target.",
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = _f(20, "Optimizer steps.")
    seed: int = _f(0, "Seed for data order and initialization of any new parameters.")
    lr: float = _f(2e-5, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    warmup_steps: int = _f(2, "Linear warmup steps, then cosine decay.")
    min_lr_ratio: float = _f(0.1, "Cosine floor as a fraction of train.lr.")
    micro_batch_size: int = _f(4, "Sequences per micro-batch when train.packing = false.")
    max_tokens: int = _f(2048, "Tokens per packed micro-batch when train.packing = true.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 = off).")
    dtype: str = _f(
        "float32", "Compute dtype: float32, or bf16 autocast (GPU).", ("float32", "bfloat16")
    )
    packing: bool = _f(
        True,
        "Padding-free packing of examples into train.max_tokens bins (false: padded batches of "
        "train.micro_batch_size).",
    )
    loss_impl: str = _f(
        "auto",
        "Cross-entropy: fused (triton on CUDA, chunked torch on CPU), or naive full logits.",
        ("auto", "triton", "torch", "naive"),
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    skip_nonfinite_steps: int = _f(
        0,
        "Optimizer steps with a non-finite loss or gradient norm to skip (weights and optimizer "
        "state untouched) before training stops naming the step; >= 0 (0 = stop at the first).",
    )
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(
        2, "Keep the newest N step checkpoints (the final one is always kept)."
    )
    parallel: str = _f(
        "fsdp",
        "Under `torchrun --nproc-per-node N` (N > 1): FSDP2 `fully_shard` (parameters, gradients and optimizer state sharded per rank) or DDP (replicated). A single process ignores it.",
        ("fsdp", "ddp"),
    )
    lora: bool = _f(
        False,
        "Train LoRA adapters (peft) instead of all weights; checkpoints hold the adapter (`adapter/`) and a merged HF export.",
    )
    lora_r: int = _f(8, "LoRA rank (S3FT used r = 8).")
    lora_alpha: int = _f(16, "LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input path.")
    lora_target_modules: str = _f(
        "all-linear",
        "Comma-separated module names to adapt (e.g. `q_proj,v_proj`), or `all-linear` (every linear layer but the lm_head).",
    )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = _f("runs/demo", "Run directory: every artifact of the run goes here.")
    mode: str = _f(
        "ssr",
        "`ssr`: the model's accepted answers + gold for the rest; `sft`: gold only (the baseline).",
        ("ssr", "sft"),
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from ssrengine.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "judge": JudgeConfig,
    "train": TrainConfig,
    "run": RunConfig,
}


def _field_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Check/convert one value to the field's type; strings from the command line are parsed."""
    want = _field_type(cls, name)
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if want is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = want(text)
        except ValueError:
            raise InputError(f"expected {want.__name__}, got {value!r}", file=where) from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise InputError(f"expected {want.__name__}, got {value!r}", file=where)
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]
    if choices and value not in choices:
        raise InputError(
            f"must be one of {', '.join(map(repr, choices))}, got {value!r}", file=where
        )
    return value


def _unknown(kind: str, name: str, known: list[str], where: str) -> InputError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"unknown {kind} '{name}'{hint}; known: {', '.join(known)}", file=where)


def build_config(raw: dict[str, Any], *, source: str = "<config>") -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and bad types."""
    sections: dict[str, Any] = {}
    for sec, values in raw.items():
        if sec not in SECTIONS:
            raise _unknown("config section", sec, list(SECTIONS), source)
        if not isinstance(values, dict):
            raise InputError(f"section [{sec}] must be a table", file=source)
        cls = SECTIONS[sec]
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise _unknown(f"key in [{sec}]", key, known, source)
            kwargs[key] = _coerce(cls, key, value, f"{source}: {sec}.{key}")
        sections[sec] = cls(**kwargs)
    return Config(**sections)


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """``--section.field=value`` (or ``--section.field value``) → nested dict of strings."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise InputError(f"expected --section.field=value, got {arg!r}", file="<command line>")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise InputError(f"missing value for --{key}", file="<command line>")
            value, i = args[i + 1], i + 1
        sec, _, name = key.partition(".")
        out.setdefault(sec, {})[name.replace("-", "_")] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read TOML (optional), apply ``--section.field=value`` overrides, validate everything."""
    raw: dict[str, dict[str, Any]] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise InputError("config file not found", file=source)
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"invalid TOML: {e}", file=source) from None
    build_config(raw, source=source)  # report file errors against the file itself
    for sec, values in parse_overrides(overrides or []).items():
        raw.setdefault(sec, {}).update(values)
    return build_config(raw, source=source if not overrides else f"{source} + command line")


def config_from_json(path: str | Path) -> Config:
    return build_config(json.loads(Path(path).read_text()), source=str(path))


def markdown_table() -> str:
    """The README's config reference, generated from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = json.dumps(f.default)
            doc = f.metadata["doc"]
            if f.metadata["choices"]:
                doc += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"] if c) + "."
            lines.append(f"| `{sec}.{f.name}` | `{default}` | {doc} |")
    return "\n".join(lines)
