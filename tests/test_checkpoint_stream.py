"""The streamed trainer-state writer writes what DCP's HuggingFaceStorageWriter writes."""

import json
import struct
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from transformers import AutoModelForCausalLM

from ssrengine.training.checkpoint import _flat_state, _save_train_tensors, _stream_dcp_shard
from ssrengine.training.loss import CausalLMLoss


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    meta["DCP_SHARDING_INFO"] = json.loads(meta["DCP_SHARDING_INFO"])
    return {"meta": meta, "tensors": header}, raw[8 + n :]


def _trainer_tensors(model_dir) -> dict[str, torch.Tensor]:
    net = CausalLMLoss(AutoModelForCausalLM.from_pretrained(model_dir))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return _flat_state(net, opt)[2]


def test_streamed_shard_equals_dcp_writer(tiny_model_dir, tmp_path):
    tensors = _trainer_tensors(tiny_model_dir)
    tensors["extra.bf16"] = torch.randn(3, 5).to(torch.bfloat16)  # mixed dtypes sort by size
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(
            tensors,
            storage_writer=HuggingFaceStorageWriter(str(tmp_path / "dcp"), save_distributed=True),
            no_dist=True,
        )
    _save_train_tensors(tensors, tmp_path / "ours", world_size=1)
    want = sorted(p.name for p in (tmp_path / "dcp").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == want
    for name in want:
        a = (tmp_path / "dcp" / name).read_bytes()
        b = (tmp_path / "ours" / name).read_bytes()
        # byte-identical but for the order of the __metadata__ keys, which safetensors takes
        # from a Rust HashMap (it varies between two calls of safetensors.torch.save)
        (ha, da), (hb, db) = _split(a), _split(b)
        assert ha == hb
        assert da == db
        assert len(a) == len(b)


def test_streamed_shard_loads_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor(2.5), "c": torch.ones(4).half()}
    _stream_dcp_shard(t, tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got.keys() == t.keys()
    for k in t:
        assert torch.equal(got[k], t[k]) and got[k].dtype == t[k].dtype
