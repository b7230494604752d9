"""A tiny random Llama and a small BPE tokenizer with a ChatML template, built in-process; a
tiny random Gemma-3 (sliding windows of a few tokens, mixed layer types) with the same
tokenizer under Gemma's special tokens and chat template."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    words = (
        "the a of to and in is was were what who when where which how many does did not no yes "
        "document documents answer question founded company city river year people built named "
        "sorry cannot found information provided mentioned contain Paris France capital tower "
        "Yes No system user assistant 0 1 2 3 4 5 6 7 8 9 . , ? ! : ' \""
    )
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return [words, alphabet, " ".join(alphabet)] * 20


def _bpe_tokenizer(special: list[str], **tokens: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


def build_tokenizer(out: Path) -> None:
    fast = _bpe_tokenizer(
        SPECIAL, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def tiny_config(vocab_size: int, *, tie: bool = True, **overrides: object):
    """The tiny Llama's config; ``overrides`` change individual fields (e.g. initializer_range)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaConfig(**{**fields, **overrides})


def build_model(out: Path, vocab_size: int, *, tie: bool = True, seed: int = 0) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(vocab_size, tie=tie)).save_pretrained(out)


def build_tiny(out: Path, *, tie: bool = True) -> Path:
    """Write tokenizer + random model into ``out`` (an HF directory) and return it."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out, len(AutoTokenizer.from_pretrained(out)), tie=tie)
    return out


# Gemma's special tokens in Gemma's order (<pad> 0, <eos> 1, <bos> 2; the turn markers are 105
# and 106 in the real vocabulary).
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
# Full attention on one layer of four, as Gemma-3 has on one of six.
GEMMA_LAYER_TYPES = [
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
]


def tiny_gemma3_config(vocab_size: int, *, window: int = 4, **overrides: object):
    """A tiny Gemma-3 text config: sliding windows of ``window`` tokens on three of four layers,
    one KV head (GQA), tied embeddings, no softcapping (as Gemma-3 270M)."""
    from transformers import Gemma3TextConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(GEMMA_LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=GEMMA_LAYER_TYPES,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma3TextConfig(**{**fields, **overrides})


def build_tiny_gemma3(out: Path, *, window: int = 4, seed: int = 0) -> Path:
    """A tiny random Gemma-3 written like `ssrengine.models.fetch` writes the real one (its
    class from the config, bf16 safetensors, Gemma's chat template, <end_of_turn> as a stop
    token) into ``out``; returns it."""
    from transformers import Gemma3ForCausalLM

    from ssrengine.models.fetch import GEMMA3_CHAT_TEMPLATE, write_model_dir

    tok = _bpe_tokenizer(GEMMA_SPECIAL, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(seed)
    src = Gemma3ForCausalLM(tiny_gemma3_config(len(tok), window=window))
    out.mkdir(parents=True, exist_ok=True)
    return write_model_dir(
        src, tok, out, chat_template=GEMMA3_CHAT_TEMPLATE, stop_tokens=("<end_of_turn>",)
    )


def records(n: int = 12) -> list[dict]:
    """Small content-grounded QA records in the record format (docs/data.md); every third is unanswerable."""
    out = []
    for i in range(n):
        answerable = i % 3 != 0
        question = "When was Acme founded?" if answerable else "Who is the CEO of Acme?"
        msgs = [{"role": "user", "content": question}]
        if i % 4 == 1:  # multi-turn
            msgs = [
                {"role": "user", "content": "Where is Acme?"},
                {"role": "assistant", "content": "In Oslo."},
                *msgs,
            ]
        out.append(
            {
                "id": f"ex-{i:03d}",
                "documents": [
                    {"title": "Acme", "text": f"Acme was founded in {1900 + i} in Oslo."}
                ],
                "messages": msgs,
                "response": f"Founded in {1900 + i}."
                if answerable
                else "The documents do not say.",
                "answerable": answerable,
            }
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
