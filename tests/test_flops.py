"""ssrengine.flops: the FLOP count against torch's own FLOP counter on a real (tiny) model."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine import IGNORE_INDEX
from ssrengine.batching import encode_rows, micro_batches
from ssrengine.config import load_config
from ssrengine.flops import example_lengths, flop_shape, micro_batch_flops, training_flops
from ssrengine.trainer import loss_sum
from tests.test_trainer import rehearsal


@pytest.mark.parametrize("tied", [True, False])
def test_flop_shape_counts_the_head_once(tiny_model_dir, tiny_untied_model_dir, tied):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir if tied else tiny_untied_model_dir)
    c = model.config
    emb = c.vocab_size * c.hidden_size
    shape = flop_shape(model)
    assert shape.head_params == emb
    total = sum(p.numel() for p in model.parameters())  # a tied weight appears once
    assert shape.dense_params == total - emb * (1 if tied else 2)
    assert shape.layers == c.num_hidden_layers


def test_linear_flops_match_torch_flop_counter(tiny_model_dir):
    """Forward + backward with every token supervised (naive loss: logits for all rows): the
    matmuls torch counts (mm/addmm: the linear layers and the head) are 6·dense·T + 6·head·T;
    attention runs through SDPA and is not among them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["--train.max_tokens=256", "--data.max_seq_len=256"])
    enc = encode_rows(rehearsal(6), tok, cfg.data)
    mb = micro_batches(enc, cfg.train, epoch=0, pad_id=tok.pad_token_id)[0]
    n = mb.input_ids.numel()
    mb.labels[:] = torch.randint(0, model.config.vocab_size, mb.labels.shape)
    with FlopCounterMode(display=False) as fc:
        loss_sum(model, mb, "naive").backward()
    counts = fc.get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm"))
    shape = flop_shape(model)
    # RMSNorm weights are in dense_params but do no matmul (the convention's small overcount)
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert linear == 6 * (shape.dense_params - norms) * n + 6 * shape.head_params * n


def test_packed_lengths_and_causal_attention(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["--train.max_tokens=256", "--data.max_seq_len=256"])
    enc = encode_rows(rehearsal(6), tok, cfg.data)
    mb = micro_batches(enc, cfg.train, epoch=0, pad_id=tok.pad_token_id)[0]
    lengths = example_lengths(mb)
    assert sum(lengths) == mb.real_tokens and len(lengths) == len(mb.ids)
    sup = int((mb.labels != IGNORE_INDEX).sum())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = flop_shape(model)
    assert micro_batch_flops(shape, mb) == training_flops(shape, lengths, sup)
    # attention alone: one example of 3 tokens attends to 1 + 2 + 3 = 6 (query, key) pairs
    bare = dataclasses.replace(shape, dense_params=0, head_params=0)
    assert training_flops(bare, [3], 0) == 3 * 4 * shape.attn_dim * shape.layers * 6
