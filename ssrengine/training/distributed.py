"""Data-parallel training on torch's own stack: torchrun → process group → FSDP2 or DDP.

    torchrun --nproc-per-node N -m ssrengine.train --config FILE --train.parallel=fsdp

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `init` reads them once per
process (NCCL for CUDA tensors, gloo for CPU tensors). Without them everything here is a no-op
and training runs in one process exactly as before.

FSDP2 (`fully_shard`): every decoder layer is its own unit (all-gathered for its forward and
backward, resharded after); the root unit holds what is left — embeddings, final norm and the
lm_head, tied or not. The loss runs inside the root's forward (`trainer.CausalLMLoss`), where
the root's parameters are unsharded plain tensors, so the fused cross-entropy kernel gets the
full [V, H] lm_head weight and its gradient is reduce-scattered like any other.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ssrengine.models.loading import pick_device

log = logging.getLogger(__name__)

# Ranks > 0 wait here while rank 0 runs generate/judge/build, which can take hours: a separate
# gloo group with a long timeout, so the training collectives keep their short default one.
DATA_STAGE_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device  # this rank's device (cuda:LOCAL_RANK, or cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world: World | None = None
_host_group: dist.ProcessGroup | None = None


def init(device: str = "auto") -> World:
    """The process group from torchrun's environment; idempotent; a single process without it.

    ``device`` is model.device: `auto`/`cuda` give each rank cuda:LOCAL_RANK, `cpu` keeps the
    ranks on the CPU (gloo)."""
    global _world, _host_group
    if _world is not None:
        return _world
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(0, 1, 0, pick_device(device))  # not cached: nothing to set up
    size = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        atexit.register(shutdown)
    _host_group = dist.new_group(backend="gloo", timeout=DATA_STAGE_TIMEOUT)
    if rank != 0:  # logging and progress bars on rank 0 only
        logging.getLogger().setLevel(logging.WARNING)
    _world = World(rank, size, local, dev)
    log.info("distributed: %d ranks, backend %s, device %s", size, dist.get_backend(), dev.type)
    return _world


def shutdown() -> None:
    """Destroy the process groups while the interpreter is fully alive; idempotent.

    Call it at the end of a successful run (after the last collective, on every rank). Left to
    interpreter exit, gloo's worker threads can still hold work objects whose destruction then
    aborts the process ("terminate called without an active exception", SIGABRT; pytorch PR
    #179291). The atexit hook registered by `init` is the fallback; on an exception path it is
    all that runs, as a collective teardown could wait on a rank that died."""
    global _world, _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _world, _host_group = None, None


def barrier() -> None:
    """All ranks meet (host-side, long timeout: rank 0 may be running a data stage)."""
    if _world is not None:
        dist.barrier(group=_host_group)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (no host sync); returns it."""
    if _world is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def no_buffer_sync_kwargs() -> dict[str, bool]:
    """DistributedDataParallel's switch for "do not broadcast buffers every forward": the
    `forward_sync_buffers` of recent torch, or `broadcast_buffers` (deprecated there) on the
    older torch an SGLang-pinned environment may have."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap(
    module: nn.Module,
    world: World,
    parallel: str,
    *,
    layers: list[nn.Module],
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap the loss module for data parallelism; a single process gets it back unchanged.

    Both FSDP2 and DDP average gradients over ranks: the trainer scales each rank's loss by the
    world size so the result is the global sum divided by the global token count.
    ``param_dtype`` (FSDP only): compute in that dtype, reduce gradients in fp32."""
    if world.size == 1:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Inputs are moved to the device by the trainer; buffers (rotary tables) never change.
        return DistributedDataParallel(module, device_ids=None, **no_buffer_sync_kwargs())
    if parallel != "fsdp":
        raise ValueError(f"unknown train.parallel {parallel!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, lm_head
    return module


@contextmanager
def grad_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients over ranks in this backward only if ``sync``: gradient accumulation
    communicates once per optimizer step, in the last micro-batch's backward, instead of once
    per micro-batch. DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync` (unsharded fp32
    gradients accumulate locally until then); a single process: nothing to do."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        with nullcontext() if sync else module.no_sync():
            yield
        return
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)  # recurses into every decoder-layer unit
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # the default for any other caller
        return
    yield


def unwrap(module: nn.Module) -> nn.Module:
    """The module `wrap` was given: DDP's inner module (its state-dict keys carry no
    ``module.`` prefix); FSDP2 shards in place, so its module is already the one."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. the grad norm under FSDP2); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
