"""Typed run configuration: one frozen dataclass per section, filled from TOML + overrides.

Every field carries its documentation in ``metadata["doc"]`` and its allowed values (a
``Literal`` type, a numeric range, non-empty, a pattern); docs/configuration.md's key table is generated
from both (``python -m ssrengine config --markdown``), so code and docs cannot drift. Reading,
overrides and validation live in `ssrengine.core.config_load`: `validate` is the one place values
are judged, at load, so later code may rely on every stated range.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def _f(
    default: Any,
    doc: str,
    choices: tuple[str, ...] | None = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
    pattern: str | None = None,
    json_object: bool = False,
) -> Any:
    """A documented field. Choices come from a ``Literal`` annotation (or ``choices``); the
    bounds, ``nonempty`` and ``pattern`` are checked by `validate` and printed in the docs.
    ``json_object``: a str field holding a JSON object's text, given as a TOML table or JSON."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    meta = {"doc": doc, "choices": choices, "nonempty": nonempty, "pattern": pattern}
    meta["json_object"] = json_object
    return field(default=default, metadata={**meta, **bounds})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str = _f(
        "smollm2-135m",
        "Embedded model name (`smollm2-135m`, `gemma3-270m`: fetched on first use, "
        "docs/models.md), a local Hugging Face model "
        "directory, or a Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) already in the Hugging "
        "Face cache (`HF_HUB_CACHE`; nothing is downloaded).",
        nonempty=True,
    )
    chat_template: str = _f(
        "",
        "Chat template replacing the tokenizer's own, wherever this run loads a tokenizer: a "
        "Jinja file path or the template text itself; empty = the tokenizer's template.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32",
        "Parameter dtype when loading (training: the master weights). float32 on CPU and GPU "
        "alike; on GPU the compute is bf16 through train.dtype. An SGLang server gets bfloat16 "
        "for float32 (SGLang's `auto` would serve an fp32 checkpoint in fp16).",
    )
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = _f(
        "auto",
        "`auto`: flash_attention_2 on CUDA when flash-attn is installed and the compute is 16-bit "
        "(model.dtype bf16/fp16, or bf16 autocast: training, generation and scoring on GPUs with "
        "bf16); else sdpa_varlen (packed rows as one SDPA call per example; plain sdpa for padded "
        "batches and generation).",
    )
    trust_remote_code: bool = _f(
        False,
        "Allow custom modeling code shipped with the model directory. Taken only from your own "
        "config file or command line, never from a saved run directory's config.json "
        '(docs/troubleshooting.md, "Run directories are data").',
    )
    device: str = _f(
        "auto",
        "`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`...",
        pattern=r"auto|cpu|mps|(cuda|xpu)(:\d+)?",
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_file: str = _f(
        "builtin:train",
        "Training data (docs/data.md's record formats): a `.jsonl`/`.jsonl.gz`, `.json`, `.csv`, "
        "`.parquet` or `.arrow` file, a `save_to_disk` or Hub-style dataset directory, or "
        "`builtin:SPLIT` for the embedded generator (train, validation, test, ood).",
        nonempty=True,
    )
    split: str = _f(
        "train",
        "Split to read from a dataset directory with several; single files ignore it.",
        nonempty=True,
    )
    max_examples: int = _f(0, "Use only the first N training examples (0 = all).", ge=0)
    max_seq_len: int = _f(1024, "Longest prompt + target in tokens.", ge=1)
    max_record_bytes: int = _f(
        1_048_576,
        "Largest data record in bytes (a JSONL line; in other formats the UTF-8 text of its "
        "fields), checked before it is parsed or tokenized: a larger one stops the run naming "
        "file and line (0 = no limit).",
        ge=0,
    )
    columns: str = _f(
        "{}",
        'Your data\'s column names for the record fields, a TOML table `{FIELD = "column"}` '
        'or JSON: e.g. `{prompt = "question", completion = "answer"}`; fields: id, '
        "documents, messages, response, answerable, prompt, completion, instruction, input, "
        "output, system, conversations. Applies to data.train_file and data.eval_file.",
        json_object=True,
    )
    on_invalid: Literal["error", "skip"] = _f(
        "error",
        "A malformed record: stop with an error naming file, line and field, or skip it and count.",
    )
    on_overlong: Literal["error", "trim_documents", "skip"] = _f(
        "error",
        "An example longer than data.max_seq_len: error, drop documents from the end until it fits, or skip and count. A target is never cut.",
    )
    system_prompt: str = _f(
        "Answer the question using only the documents. If the documents do not contain the answer, say so.",
        "Instruction placed before the documents in the system message. This default, about "
        "documents, only for records that carry documents (a record without gets no system "
        "turn); any other value for every record.",
    )
    seed: int = _f(0, "Seed of the embedded dataset generator.", ge=0)
    eval_file: str = _f(
        "",
        "Validation records (same formats as data.train_file, `builtin:validation` included): "
        "validation loss on their gold answers every train.eval_every steps. Empty = none.",
    )
    eval_split: str = _f(
        "validation",
        "Split to read from a dataset directory with several given as data.eval_file.",
        nonempty=True,
    )
    eval_fraction: float = _f(
        0.0,
        "Without data.eval_file: hold out this fraction of the rehearsal set (chosen by a hash "
        "of each id, so the same rows on every run) for the validation loss; the rest trains.",
        ge=0,
        lt=1,
    )


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    backend: Literal["hf", "sglang", "sglang-http", "openai"] = _f("hf", "Generation backend.")
    model: str = _f("", "Model for generation; empty = model.path.")
    max_new_tokens: int = _f(96, "Longest generated answer.", ge=1)
    temperature: float = _f(0.0, "0 = greedy (the paper's setting).", ge=0)
    top_p: float = _f(1.0, "Nucleus sampling mass (temperature > 0 only).", gt=0, le=1)
    num_samples: int = _f(
        1,
        "Answers sampled per prompt (1 = one answer, greedy at temperature 0). With k > 1 "
        "(needs generation.temperature > 0) sample i is drawn with seed train.seed + i, each "
        "is judged, and the first accepted in sample order becomes the target. The paraphrase "
        "and prefix tiers take one answer (sample 0).",
        ge=1,
    )
    batch_size: int = _f(
        16, "Prompts per backend call (hf: per forward batch, length-sorted).", ge=1
    )
    url: str = _f(
        "", "Server base URL(s) for sglang-http / openai, comma-separated for round-robin."
    )
    launch: bool = _f(
        False,
        "sglang-http: start `python -m sglang.launch_server` for generation.model and stop it at exit.",
    )
    launch_python: str = _f(
        "",
        "sglang-http with generation.launch: the Python that runs `-m sglang.launch_server`, e.g. "
        "`/opt/sglang/bin/python` when SGLang lives in its own environment (docs/generation.md, "
        '"Environments"); empty = this interpreter. Taken only from your own config file or '
        "command line, never from a saved run directory's config.json.",
    )
    tp_size: int = _f(1, "SGLang tensor-parallel size.", ge=1)
    dp_size: int = _f(1, "SGLang data-parallel size.", ge=1)
    mem_fraction: float = _f(0.85, "SGLang static memory fraction.", gt=0, le=1)
    concurrency: int = _f(4, "HTTP backends: batches in flight at once.", ge=1)
    timeout_s: float = _f(
        120.0,
        "HTTP backends: the connect and every read of a reply wait at most this long.",
        gt=0,
        le=86400,
    )
    deadline_s: float = _f(
        600.0,
        "HTTP backends: a whole request (connect, send, the server's work, the reply) ends "
        "after this long, however the reply trickles in; it is then retried like a timeout.",
        gt=0,
        le=86400,
    )
    max_reply_bytes: int = _f(
        67_108_864,
        "HTTP backends: a reply larger than this is not read (stops the stage, not retried).",
        ge=1024,
    )
    max_retries: int = _f(
        5, "HTTP backends: retries with exponential backoff before giving up.", ge=0
    )


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    kind: str = _f(
        "rule",
        "`rule`: refusal agreement + answer token-F1; `llm`: P(Yes) from one step of next-token "
        "logprobs; `python:MODULE:NAME`: your own judge (a function `(example, candidate)` "
        "returning a Verdict or a bool, or a Judge class), see docs/judges.md. A `python:` judge "
        "is taken only from your own config file or command line, never from a saved run "
        "directory's config.json.",
        pattern=r"rule|llm|python:[\w.]+:[\w.]+",
    )
    threshold: float = _f(
        0.5, "LLM judge: accept when P(Yes)/(P(Yes)+P(No)) >= threshold.", ge=0, le=1
    )
    min_f1: float = _f(
        0.3,
        "Rule judge: accept an answer when its token F1 against the gold answer is >= min_f1 "
        "and it contains every number of the gold answer.",
        ge=0,
        le=1,
    )
    match: Literal["f1", "contains"] = _f(
        "f1",
        "Rule judge, how an answer must match the gold answer: `f1` = token F1 >= "
        "judge.min_f1; `contains` = the gold's key values are in the answer (its numbers and "
        "names, or every content word where it has neither), so a correct answer in other words "
        '("The answer to this classic math problem is 4." for "4.") is accepted and a fluent '
        "wrong one rejected. Both require every number of the gold answer.",
    )
    rubric: str = _f(
        "",
        "LLM judge: a text file with the grading instructions (the system message; it must ask "
        "for a one-word Yes or No); empty = the built-in rubric.",
    )
    refusal_patterns: str = _f(
        "",
        "Rule judge: a regular expression (Python `re`, case-insensitive; alternatives in one pattern) "
        "that also marks an answer as declining, beside the built-in phrases.",
    )
    grounding: bool = _f(
        False,
        "Rule judge: also reject an answer with more than judge.max_ungrounded content words "
        "(lowercase words outside a stopword list, and numbers) found in neither the documents, "
        "the conversation nor the gold answer. Refusals are exempt.",
    )
    max_ungrounded: int = _f(
        0,
        "Content words an answer may have outside documents, conversation and gold answer "
        "(judge.grounding and the paraphrase filter).",
        ge=0,
    )
    model: str = _f("", "LLM judge model; empty = model.path.")
    backend: Literal["", "hf", "sglang", "sglang-http", "openai"] = _f(
        "", "LLM judge backend; empty = generation.backend."
    )
    url: str = _f("", "LLM judge server URL(s); empty = generation.url.")
    batch_size: int = _f(16, "Examples per judge call.", ge=1)
    paraphrase: bool = _f(
        False,
        "S3FT tier: for rejected answers, the base model paraphrases the gold answer; an accepted paraphrase becomes the target.",
    )
    paraphrase_filter: bool = _f(
        True,
        "Paraphrase tier: before the judge, reject echoes of the request (starts 'A correct "
        "answer is', or judge.paraphrase_max_echo of its word trigrams are the request's "
        "instruction words) and answers with more than judge.max_ungrounded ungrounded content words.",
    )
    paraphrase_max_echo: float = _f(
        0.5,
        "Paraphrase filter: reject a candidate when at least this share of its word trigrams "
        "occur in the request's instruction text.",
        gt=0,
        le=1,
    )
    prefix: bool = _f(
        False,
        "Gold decision, own words: for rejected answers, the base model continues the gold answer's first sentence (forced as the start of its answer) up to its first sentence end; an accepted completion becomes the target (source `prefix`).",
    )
    gold_answerable_share: float = _f(
        0.0,
        "Class-aware selection: keep accepted answerable examples as gold (hard negatives: same documents as an unanswerable gold example first, then the least sure verdicts) until answerable examples are at least this share of G (0 = off).",
        ge=0,
        lt=1,
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = _f(
        0,
        "Optimizer steps; 0 (the default) = as many as train.epochs takes. Give train.max_steps "
        "or train.epochs, not both.",
        ge=0,
    )
    epochs: float = _f(
        1.0,
        "Passes over the rehearsal set (the run length unless train.max_steps is above 0): "
        "steps = ceil(epochs × micro-batches per epoch / (train.grad_accum × ranks)).",
        gt=0,
    )
    seed: int = _f(0, "Seed for data order and initialization of any new parameters.", ge=0)
    lr: float = _f(2e-5, "Peak learning rate (AdamW).", gt=0, le=1e6)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0, le=1e6)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.95, "AdamW beta2.", ge=0, lt=1)
    adam_eps: float = _f(1e-8, "AdamW epsilon.", gt=0, le=1)
    optimizer: str = _f(
        "adamw",
        "`adamw` (torch's foreach implementation on CUDA), `adamw_fused` (torch's fused "
        "kernel: one launch per step on CUDA), or any `torch.optim` class by name (`SGD`, "
        "`Adam`, `Adafactor`, `RMSprop`, ...) built with train.lr, train.weight_decay on "
        "matrices and train.optimizer_kwargs.",
        pattern=r"adamw|adamw_fused|[A-Z]\w*",
    )
    optimizer_kwargs: str = _f(
        "{}",
        "Keyword arguments of the optimizer, a TOML table (`optimizer_kwargs = {momentum = "
        "0.9}`) or JSON text; for AdamW they override train.adam_*.",
        json_object=True,
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f(
        "cosine",
        "After train.warmup_steps of linear warmup: cosine or linear decay to "
        "train.min_lr_ratio × train.lr at the last step, or constant.",
    )
    warmup_steps: int = _f(
        2,
        "Linear warmup steps (step s of W runs at s / W × train.lr: step W is the first at the "
        "peak), then train.lr_scheduler.",
        ge=0,
    )
    warmup_ratio: float = _f(
        0.0,
        "Warmup as a share of the run's optimizer steps (ceil(ratio × steps)), instead of "
        "train.warmup_steps when above 0; give one of the two.",
        ge=0,
        le=1,
    )
    min_lr_ratio: float = _f(
        0.1, "Floor of the cosine and linear decay as a fraction of train.lr.", ge=0, le=1
    )
    micro_batch_size: int = _f(4, "Sequences per micro-batch when train.packing = false.", ge=1)
    max_tokens: int = _f(2048, "Tokens per packed micro-batch when train.packing = true.", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 = off).", ge=0, le=1e6)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "Training compute dtype: `auto` = bf16 autocast over fp32 weights on CUDA GPUs with "
        "bf16 (Ampere and newer), float32 on older GPUs and the CPU (bf16 matmuls are slow "
        "without AMX); or `float32` / `bfloat16` everywhere; `float16`: fp16 autocast with a "
        "dynamic loss scale (torch.amp.GradScaler) for GPUs without bf16 (T4, V100), over "
        "model.dtype = float32, one GPU or train.parallel = ddp.",
    )
    packing: bool = _f(
        True,
        "Padding-free packing of examples into train.max_tokens bins (false: padded batches of "
        "train.micro_batch_size).",
    )
    loss_impl: Literal["auto", "triton", "torch", "naive"] = _f(
        "auto",
        "Cross-entropy: fused (triton on CUDA, chunked torch on CPU), or naive full logits.",
    )
    loss_weight_self: float = _f(
        1.0, "Loss weight of every target token from the model's own accepted answers (R).", ge=0
    )
    loss_weight_paraphrase: float = _f(1.0, "Loss weight of paraphrase targets' tokens.", ge=0)
    loss_weight_prefix: float = _f(
        1.0, "Loss weight of gold-decision-prefix targets' tokens (the `prefix` tier).", ge=0
    )
    loss_weight_gold: float = _f(1.0, "Loss weight of gold targets' tokens (G).", ge=0)
    loss_weight_gold_answerable: float = _f(
        1.0,
        "Multiplies train.loss_weight_gold for gold targets of answerable examples (they carry "
        "the decision to answer).",
        ge=0,
    )
    loss_weight_gold_unanswerable: float = _f(
        1.0,
        "Multiplies train.loss_weight_gold for gold targets of unanswerable examples (the "
        "refusals).",
        ge=0,
    )
    gold_balance: Literal["off", "sft"] = _f(
        "off",
        "`sft`: answerable gold targets weigh n_answerable / n_answerable_gold more, so they "
        "carry the answer decision with the weight all answerable examples carry under SFT "
        "(SSR trains most answerable examples on own answers the model already produces); "
        "computed over the whole rehearsal set, on top of the other weights.",
    )
    unlikelihood_weight: float = _f(
        0.0,
        "Unlikelihood on the refusal for accepted own answers of answerable examples: adds "
        "weight × −log(1 − p(refusal token)) at the first target token where the own answer "
        "departs from train.unlikelihood_text (Welleck et al. 2019), normalized like the loss; "
        "0 = off.",
        ge=0,
    )
    unlikelihood_text: str = _f(
        "The documents do not say.",
        "The refusal whose first distinguishing token train.unlikelihood_weight penalizes.",
        nonempty=True,
    )
    decision_tokens: int = _f(
        0,
        "The first N target tokens of every example (the answer-or-decline decision) get "
        "train.decision_weight on top of their source weight (0 = off).",
        ge=0,
    )
    decision_weight: float = _f(1.0, "Loss weight multiplier of the train.decision_tokens.", ge=0)
    loss_per_example: bool = _f(
        False,
        "Divide each example's token weights by its number of target tokens, so every example weighs its source weight in total however long its target (the step loss becomes the weighted mean over examples of their mean token loss).",
    )
    loss_grad_filter: bool = _f(
        False,
        "Fused loss: skip backward vocabulary tiles whose softmax stays below the compute "
        "dtype's eps / 32 (cut-cross-entropy's gradient filtering; 2^-12 in bf16, 2^-28 in "
        "fp32): faster on large vocabularies, gradients change by about the dtype's rounding.",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    skip_nonfinite_steps: int = _f(
        0,
        "Optimizer steps with a non-finite loss or gradient norm to skip (weights and optimizer "
        "state untouched) before training stops naming the step (0 = stop at the first).",
        ge=0,
    )
    divergence_factor: float = _f(
        10.0,
        "Stop training, before the step is recorded or checkpointed, when its loss reaches "
        "ln(vocabulary size) (uniform guessing) from a running median clearly below it, or "
        "exceeds this many times the median loss of the last 32 steps (that median taken as "
        "at least 0.05 × ln(vocabulary size)); 0 = off.",
        ge=0,
        le=1e6,
    )
    compile: bool = _f(
        False,
        "torch.compile each decoder layer (fused elementwise work: norms, RoPE, SiLU x up, "
        "residual adds; attention runs eager inside it), dynamic in the token count so packed "
        "lengths do not recompile. On CPU (SmolLM2, fp32, 2,048-token rows) about 10% faster per "
        "step and 1.4 GB less peak memory, after about 30 s of compile in the first step; it "
        "needs a C++ compiler there (docs/benchmarks.md, training).",
    )
    compile_memory_budget: float = _f(
        0.8,
        "train.compile: the activation memory budget of the backward partitioner "
        "(torch._functorch.config.activation_memory_budget): 1.0 keeps what the min-cut keeps, "
        "lower recomputes more in the backward. 0.8 keeps the matmul outputs and recomputes "
        "only elementwise work (SmolLM2: 23% fewer saved bytes, no slower); around 0.5 "
        "it recomputes matmuls too.",
        gt=0,
        le=1,
    )
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).", ge=0)
    eval_every: int = _f(
        0,
        "Validation loss (data.eval_file or data.eval_fraction) every N steps and at the last "
        "step, into metrics.jsonl as `eval_loss` (0 = at the last step only; none without "
        "validation data).",
        ge=0,
    )
    keep_best: bool = _f(
        False,
        "Keep the checkpoint of the lowest validation loss as checkpoints/best (a checkpoint "
        "is saved at each evaluation that improves it).",
    )
    callbacks: tuple[str, ...] = _f(
        (),
        "Your training callbacks, `python:MODULE:NAME` each (a class built with no arguments, "
        "or an object, with any of on_step_end, on_evaluate, on_checkpoint, on_train_end), "
        "called on rank 0; see docs/training.md. Taken only from your own config file or "
        "command line, never from a saved run directory's config.json.",
    )
    log_every: int = _f(
        0,
        "When stderr is not a terminal (a pipe or a log file): no progress bar, a plain log "
        "line every N steps and at the last (0 = about 20 lines a run).",
        ge=0,
    )
    report_to: tuple[str, ...] = _f(
        (),
        "Metrics also to these trackers (metrics.jsonl is always written): a TOML list or "
        "comma-separated; tensorboard writes run.dir/tensorboard.",
        ("tensorboard", "wandb", "trackio"),
    )
    keep_checkpoints: int = _f(
        2, "Keep the newest N step checkpoints (0 = all; the final one is always kept).", ge=0
    )
    parallel: Literal["fsdp", "ddp"] = _f(
        "fsdp",
        "Under `torchrun --nproc-per-node N` (N > 1): FSDP2 `fully_shard` (parameters, gradients and optimizer state sharded per rank) or DDP (replicated). A single process ignores it.",
    )
    lora: bool = _f(
        False,
        "Train LoRA adapters (peft) instead of all weights; every checkpoint holds the adapter (`adapter/`) and the resume state, the final one also the merged model (`export --format hf` merges any other).",
    )
    lora_r: int = _f(8, "LoRA rank (S3FT used r = 8).", ge=1)
    lora_alpha: int = _f(16, "LoRA scaling numerator: the update is scaled by alpha / r.", gt=0)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input path.", ge=0, lt=1)
    lora_target_modules: str = _f(
        "all-linear",
        "Comma-separated module names to adapt (e.g. `q_proj,v_proj`), or `all-linear` (every linear layer but the lm_head).",
        nonempty=True,
    )
    lora_config: str = _f(
        "{}",
        "Any further peft LoraConfig fields, a TOML table or JSON text (`{use_dora = true, "
        'use_rslora = true, modules_to_save = ["embed_tokens"], bias = "lora_only"}`), over '
        "train.lora_config_file and the train.lora_* keys.",
        json_object=True,
    )
    lora_config_file: str = _f(
        "",
        "A JSON file of peft LoraConfig fields (e.g. a peft adapter_config.json), over the "
        "train.lora_* keys; train.lora_config goes over it.",
    )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = _f("runs/demo", "Run directory: every artifact of the run goes here.", nonempty=True)
    mode: Literal["ssr", "sft"] = _f(
        "ssr",
        "`ssr`: the model's accepted answers + gold for the rest; `sft`: gold only (the baseline).",
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
        """Every section as plain values, as config.json and every other saved copy hold them:
        credentials in URLs (generation.url, judge.url) replaced by ``***``."""
        from ssrengine.core.urls import redact_values

        return redact_values(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        from ssrengine.core.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "judge": JudgeConfig,
    "train": TrainConfig,
    "run": RunConfig,
}
