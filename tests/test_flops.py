"""Model FLOPs and MFU: the count for the tiny model against a hand computation, the peak
table's lookup, and `mfu` in metrics.jsonl (None on the CPU)."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from ssrengine.models import flops
from ssrengine.models.packing import pack
from ssrengine.training.batching import Encoded, packed_micro_batch, padded_batch


def test_tiny_model_flops_by_hand(tiny_model_dir):
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    # tests/tiny.py: H 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads.
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    q = o = 64 * 64
    k = v = 64 * 32  # 2 KV heads x 16
    mlp = 3 * 64 * 128
    per_token = 6 * 2 * (q + k + v + o + mlp)  # 442,368
    head = 6 * cfg.vocab_size * 64
    pair = 12 * 2 * 4 * 16  # QK^T and AV, forward + backward, per layer and head
    m = flops.ModelFlops.from_config(cfg)
    assert (m.per_token, m.per_supervised_token, m.per_attention_pair) == (per_token, head, pair)
    # Examples of 3 and 5 tokens, 4 of them supervised: 6 + 15 causal pairs.
    assert m.batch([3, 5], 4) == 8 * 442_368 + 4 * head + 21 * pair


def test_step_flops_from_micro_batches_packed_or_padded(tiny_model_dir):
    """Packed or padded, the same examples are the same work: padding costs no model FLOPs."""
    m = flops.ModelFlops.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    items = [
        Encoded(str(n), list(range(3, 3 + n)), [-100] * 2 + list(range(5, 3 + n)))
        for n in (4, 9, 6)
    ]
    padded = [padded_batch(items[:2], 0), padded_batch(items[2:], 0)]
    [packed] = pack([(e.input_ids, e.labels) for e in items], 32)
    packed_mb = packed_micro_batch(packed)
    assert sorted(packed_mb.seq_lens) == [4, 6, 9] and padded[0].seq_lens == (4, 9)
    want = m.batch([4, 9, 6], sum(n - 2 for n in (4, 9, 6)))  # 2 prompt tokens each
    assert m.step(padded) == m.step([packed_mb]) == want


def test_peak_table_lookup():
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.peak_flops_for("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.peak_flops_for("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert flops.peak_flops_for("NVIDIA A100-SXM4-80GB", "float32", tf32=True) == 156e12
    assert flops.peak_flops_for("NVIDIA A10", "bfloat16") == 125e12
    assert flops.peak_flops_for("NVIDIA L40S", "bfloat16") == 362e12
    assert flops.peak_flops_for("NVIDIA L4", "bfloat16") == 121e12
    assert flops.peak_flops_for("NVIDIA A10G", "bfloat16") is None
    # GA102 whitepaper: dense BF16 with FP32 accumulate 71, TF32 35.6, FP32 35.6
    assert flops.peak_flops_for("NVIDIA GeForce RTX 3090", "bfloat16") == 71e12
    assert flops.peak_flops_for("NVIDIA GeForce RTX 3090", "float32", tf32=True) == 35.6e12
    assert flops.peak_flops_for("NVIDIA H200 NVL", "bfloat16") == 835e12  # not the SXM's 989
    assert flops.peak_flops_for("NVIDIA H200", "bfloat16") == 989e12
    assert flops.peak_flops_for("NVIDIA GH200 480GB", "float32") == 67e12
    assert flops.peak_flops_for("Some Future GPU", "bfloat16") is None
    assert flops.device_peak_flops(torch.device("cpu"), "float32") is None


def test_mfu():
    assert flops.mfu(1e12, 2.0, 1e12, ranks=2) == 0.25
    assert flops.mfu(1e12, 2.0, None) is None


def test_metrics_row_carries_mfu_where_the_peak_is_known(tiny_model_dir, tmp_path, monkeypatch):
    """None on the CPU; with a known peak (pretended here), the step's model FLOPs over its
    global micro-batches / (step time x peak)."""
    from ssrengine.training.trainer import _metrics_row, setup, train_step
    from tests.test_trainer import _cfg, rehearsal

    cfg = _cfg(tiny_model_dir, tmp_path, "--train.grad_accum=2", "--train.packing=true",
               "--train.max_tokens=512", "--data.max_seq_len=256")  # fmt: skip
    tr = setup(cfg, tmp_path, rows=rehearsal())
    s = train_step(tr)
    assert _metrics_row(tr, s, 0.5, None).mfu is None
    monkeypatch.setattr(flops, "device_peak_flops", lambda device, dtype: 1e9)
    mbs = [tr.stream[0], tr.stream[1]]
    assert sum(mb.real_tokens for mb in mbs) == s.tokens
    want = flops.ModelFlops.from_config(tr.hf_model.config).step(mbs) / (0.5 * 1e9)
    assert _metrics_row(tr, s, 0.5, None).mfu == round(want, 4) > 0


def test_matmul_flops_match_torch_flop_counter(tiny_model_dir):
    """Forward + backward with every token supervised (naive loss: logits for all rows): the
    matmuls torch counts (mm/addmm: the decoder's linear layers and the head) are exactly
    per_token·T + per_supervised_token·T; attention runs through SDPA and is not among them."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssrengine.core.config_load import load_config
    from ssrengine.training.batching import encode_rows, micro_batches
    from ssrengine.training.loss import loss_sum
    from tests.test_trainer import rehearsal

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["--train.max_tokens=256", "--data.max_seq_len=256"])
    mb = micro_batches(encode_rows(rehearsal(6), tok, cfg.data), cfg.train, epoch=0,
                       pad_id=tok.pad_token_id)[0]  # fmt: skip
    n = mb.input_ids.numel()
    mb.labels[:] = torch.randint(0, model.config.vocab_size, mb.labels.shape)
    with FlopCounterMode(display=False) as fc:
        loss_sum(model, mb, "naive").backward()
    counts = fc.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm"))
    mf = flops.ModelFlops.from_config(model.config)
    assert matmul == mf.per_token * n + mf.per_supervised_token * n
