"""Run under torchrun by tests/test_grad_sync.py: one optimizer step's gradient accumulation on
2 ranks, counting the gradient collectives it issues.

    torchrun --nproc-per-node 2 tests/grad_sync_probe.py MODEL_DIR {fsdp,ddp} ACCUM OUT_DIR [IMPL]

Rank r takes the global micro-batches r, r + 2, ... of `micro_batches_for_probe`. Counted:
FSDP2's reduce-scatters (`dist.reduce_scatter_single`, the one call of its ReduceScatter in
torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py) and DDP's bucket all-reduces (through
a comm hook wrapping the default all-reduce). Rank 0 writes the full gradients
(grads.safetensors) and the counts (counts.json) to OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ssrengine.models.layers import decoder_layers
from ssrengine.models.loading import load_model
from ssrengine.training import distributed
from ssrengine.training.loss import CausalLMLoss, accumulate


def micro_batches_for_probe(n: int):
    """n padded micro-batches of 2 rows each, fixed by a seed (labels on the second half)."""
    from ssrengine.training.batching import Encoded, padded_batch

    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        items = []
        for j in range(2):
            length = 9 + 3 * k + j
            ids = torch.randint(3, 300, (length,), generator=g).tolist()
            labels = [-100] * (length // 2) + ids[length // 2 :]
            items.append(Encoded(f"{k}-{j}", ids, labels))
        out.append(padded_batch(items, pad_id=0))
    return out


def full_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = distributed.unwrap(net)
    return {
        name: distributed.full_value(p.grad).detach().clone().contiguous()
        for name, p in inner.named_parameters()
        if p.grad is not None
    }


def main(model_dir: str, parallel: str, accum: int, out_dir: Path, impl: str = "torch") -> None:
    world = distributed.init("cpu")
    torch.manual_seed(0)
    model = load_model(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    model.train()
    layers = decoder_layers(model) if parallel == "fsdp" else []
    net = distributed.wrap(CausalLMLoss(model, impl), world, parallel, layers=layers)
    calls = {"n": 0}
    if parallel == "fsdp":
        real = dist.reduce_scatter_single

        def counting(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        dist.reduce_scatter_single = counting
    else:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            calls["n"] += 1
            return allreduce_hook(state, bucket)

        net.register_comm_hook(None, hook)
    direct = {"n": 0}
    if impl == "triton":  # count the backwards that added into .grad themselves
        from ssrengine.kernels import triton_cross_entropy as tce

        real_buffer = tce._grad_buffer

        def counting_buffer(leaf):
            buf = real_buffer(leaf)
            direct["n"] += buf is not None
            return buf

        tce._grad_buffer = counting_buffer
    mbs = micro_batches_for_probe(accum * world.size)
    mine = [mbs[world.rank + world.size * i] for i in range(accum)]
    accumulate(net, mine, impl=impl, world_size=world.size)
    grads = full_grads(net)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(grads, str(out_dir / "grads.safetensors"))
        (out_dir / "counts.json").write_text(
            json.dumps({"collectives": calls["n"], "into_grad": direct["n"]})
        )
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
