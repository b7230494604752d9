"""Checkpoints: trainer state to resume from, and an HF directory `from_pretrained` and SGLang load.

```
checkpoints/step-N/
  config.json, model.safetensors                    HF export (rank 0, full weights); LoRA: the
                         merged model, in the run's final checkpoint only (`hf_export` below)
  tokenizer files        tokenizer and chat template (every checkpoint)
  adapter/               LoRA only: adapter_config.json + adapter_model.safetensors (peft)
  dcp/                   torch.distributed.checkpoint in safetensors (HuggingFaceStorageWriter):
    shard-0000R-model-00001-of-00001.safetensors   one per rank R (1-based) that holds tensors:
                         its shards of the trainable weights (`model.<fqn>`) and AdamW moments
                         and step (`optim.state.<fqn>.<name>`), each with its offsets in the
                         global tensor (`DCP_SHARDING_INFO` in the safetensors header), so it
                         loads on any world size; replicated tensors are written by one rank
  run_config.json        the resolved ssrengine config
  trainer_state.json     step, data position, scheduler, optimizer param groups (lr, betas,
                         weight decay, ...) and any non-tensor optimizer state, metrics summary,
                         ``hf_export`` (whether config.json + weights are here)
  rng.safetensors        torch (and CUDA) RNG state of rank 0, restored on every rank
```
Full fine-tuning: every checkpoint is an HF directory. LoRA: every checkpoint holds the
adapter and the resume state (43 MB for SmolLM2-135M at r = 8, all-linear: adapter 10 MB,
adapter + AdamW moments in dcp/ 30 MB, tokenizer 3.5 MB), and only the one that reaches
train.max_steps also holds the merged model (a copy of the whole model in model.dtype: 538 MB
more in fp32, ~28 GB at 7B). `ssrengine.models.lora.hf_dir` merges an adapter-only checkpoint
on demand (eval of an interrupted run; `export --format hf --checkpoint step-N`).
trainer_state.json also lists every other file of the checkpoint (``files``: the HF export,
adapter/, dcp/, rng.safetensors, run_config.json) with its size and SHA-256, hashed at save:
`checkpoint_damage` finds a missing, truncated or overwritten one (a shard with bytes zeroed
at the same size included) before anything is loaded, and the trainer resumes, and eval
evaluates, the newest checkpoint without damage, naming each damaged newer one in a warning.
Hashing reads the checkpoint once more at save and once at resume or eval (measured in
docs/training.md, "Resuming"). Checkpoints written before the hashes are checked by size.
Resuming reads dcp/ (never the export), so the optimizer state survives a change of world size
or of train.parallel. No pickle anywhere: tensors are safetensors, everything else JSON; DCP's
own `.metadata` (a pickle) is not written, its reader rebuilds the metadata from the safetensors
headers. A checkpoint is written to a temp dir and renamed by rank 0 after every rank finished,
so ``step-N`` exists only when complete. With several nodes, checkpoints/ must be on a
filesystem all of them see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.models import lora
from ssrengine.models.loading import quiet_transformers
from ssrengine.training import distributed

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
DCP_DIR = "dcp"
TRAINER_STATE = "trainer_state.json"
RNG = "rng.safetensors"
# Frozen weights (the LoRA base model) are not trainer state: they come from model.path.
# Loading is non-strict only about them: dcp.load fails on any requested key the checkpoint lacks.
_SHARDED = StateDictOptions(ignore_frozen_params=True, strict=False)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# The file DCP's HuggingFaceStorageWriter(save_distributed=True) names rank 0's shard.
DCP_SINGLE_SHARD = "shard-00001-model-00001-of-00001.safetensors"
_SAFETENSORS_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def file_sha256(path: Path) -> str:
    """The file's SHA-256, streamed (hashlib reads it in 256 KiB blocks: flat memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_records(root: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``root`` but trainer_state.json (which holds them)."""
    return {
        str(f.relative_to(root)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != TRAINER_STATE
    }


def checkpoint_damage(path: Path, *, resume: bool = True) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (``resume``) or evaluated, as ``FILE:
    what is wrong``; None if it can. Sizes and safetensors headers first, then every recorded
    SHA-256. Evaluating needs no trainer state, only undamaged files."""
    try:
        state = read_trainer_state(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path / TRAINER_STATE}: unreadable ({e})"
    if not isinstance(state, dict):
        return f"{path / TRAINER_STATE}: not a JSON object"
    missing = [k for k in ("step", "scheduler", "optimizer") if k not in state]
    if missing and resume:
        return f"{path / TRAINER_STATE}: lacks {', '.join(missing)}"
    files = state.get("files")  # absent in checkpoints written before the list existed
    if files is None and not resume:
        return None  # nothing recorded to check the export against
    if files is None:
        files = {str(f.relative_to(path)): None for f in (path / DCP_DIR).glob("*.safetensors")}
        files.setdefault(RNG, None)
        if len(files) == 1:
            return f"{path / DCP_DIR}: no shard"
    # Checkpoints of earlier versions record a size (int) or nothing; now {"size", "sha256"}.
    records = {k: v if isinstance(v, dict) else {"size": v} for k, v in files.items()}
    for name, rec in sorted(records.items()):
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        size = rec.get("size")
        if size is not None and f.stat().st_size != size:
            return f"{f}: {f.stat().st_size} bytes, written with {size} (truncated or overwritten)"
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"{f}: not a complete safetensors file ({e})"
    for name, rec in sorted(records.items()):
        if rec.get("sha256") and file_sha256(path / name) != rec["sha256"]:
            return (
                f"{path / name}: contents differ from the SHA-256 recorded at save "
                "(overwritten or corrupted)"
            )
    return None


def resumable_checkpoint(ckpt_root: Path, *, resume: bool = True) -> Path | None:
    """The newest checkpoint without damage (each damaged newer one named in a warning); None
    when there is no checkpoint. Raises InputError when every checkpoint is damaged.
    ``resume`` False: the checkpoint eval reads (`verified_checkpoint`)."""
    use = "resumed from" if resume else "evaluated"
    found = list_checkpoints(ckpt_root)
    damage = []
    for _, path in reversed(found):
        why = checkpoint_damage(path, resume=resume)
        if why is None:
            return path
        log.warning("damaged checkpoint, not %s: %s", use, why)
        damage.append(why)
    if damage:
        raise InputError(
            f"no checkpoint can be {use} ({'; '.join(damage)}); delete {ckpt_root} to "
            "train from scratch",
            file=str(ckpt_root),
        )
    return None


def verified_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint eval reads: the newest without damage (`resumable_checkpoint`)."""
    return resumable_checkpoint(ckpt_root, resume=False)


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (a tied lm_head)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def full_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Unsharded CPU weights on rank 0 (empty dict elsewhere); a collective under FSDP2.

    ``prefix`` (e.g. ``model.`` of the loss wrapper) is stripped from the keys."""
    sd = get_model_state_dict(model, options=_FULL)
    # A tied lm_head is stored once (as the embedding), as save_pretrained would.
    aliases = tied_aliases(model)
    return {
        k.removeprefix(prefix): v
        for k, v in sd.items()
        if k.startswith(prefix) and k not in aliases
    }


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: nn.Module,
    hf_model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    extra: dict[str, Any],
    keep: int,
    peft_model: Any = None,
    prefix: str = "model.",
    merged: bool = True,
) -> Path:
    """Collective: every rank calls it. ``model`` is the (wrapped) module the optimizer trains,
    ``hf_model`` the transformers model inside it under ``prefix``; ``peft_model`` for LoRA.
    ``merged``: with LoRA, also write the merged HF export (the run's final checkpoint);
    without, the adapter only. Full fine-tuning always writes the HF export."""
    world = distributed.init()
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp"
    if world.is_main:
        for old in ckpt_root.glob(".step-*.tmp"):  # this one, or left by an interrupted save
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    tensors, optim_json = _flat_state(distributed.unwrap(model), optimizer)[2:]
    with warnings.catch_warnings():  # "assuming ... a single process": yes, when size == 1
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        try:
            _save_train_tensors(tensors, tmp / DCP_DIR, world.size)
        except CheckpointException as e:
            # DCP catches BaseException in its save steps and re-raises it wrapped
            # (torch/distributed/checkpoint/utils.py, _DistWrapper): unwrap an interrupt.
            if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
                raise KeyboardInterrupt from e
            raise
    weights = full_state_dict(distributed.unwrap(model), prefix)
    if world.is_main:
        hf_export = peft_model is None or merged
        _export_hf(tmp, weights, hf_model=hf_model, peft_model=peft_model, cfg=cfg, merged=merged)
        tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        rng = {"torch": torch.get_rng_state()}
        if world.device.type == "cuda":  # this rank's device only: no context on the others
            rng["cuda"] = torch.cuda.get_rng_state(world.device)
        save_file(rng, str(tmp / RNG))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            "step": step,
            "scheduler": sched,
            "optimizer": optim_json,
            "world_size": world.size,
            "hf_export": hf_export,
            "files": _file_records(tmp),  # every rank's shards are written by now
            **extra,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = list_checkpoints(ckpt_root)
        # Newer steps belong to the run before a resume from an older (undamaged) checkpoint.
        stale = [p for s, p in done if s > step]
        older = [p for s, p in done if s < step]
        for p in stale + (older[: max(0, len(older) - keep + 1)] if keep > 0 else []):
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(lora.merged_dir(p), ignore_errors=True)  # eval's merge of it (LoRA)
    distributed.barrier()
    return final


def _save_train_tensors(tensors: dict[str, torch.Tensor], out: Path, world_size: int) -> None:
    """Write ``tensors`` as DCP's HuggingFaceStorageWriter would: one process with plain CPU
    tensors streams them (`_stream_dcp_shard`); otherwise (DTensors, devices, ranks) dcp.save."""
    if world_size == 1 and all(
        type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors.values()
    ):
        out.mkdir(parents=True, exist_ok=True)
        _stream_dcp_shard(tensors, out / DCP_SINGLE_SHARD)
        return
    with warnings.catch_warnings():  # "assuming ... a single process": yes, when size == 1
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(
            tensors,
            storage_writer=HuggingFaceStorageWriter(str(out), save_distributed=True),
            no_dist=world_size == 1,
        )


def _stream_dcp_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The safetensors file DCP writes for one rank, written tensor by tensor from the tensors'
    own memory. DCP's writer (torch/distributed/checkpoint/filesystem.py,
    `_write_files_from_queue`) calls `safetensors.torch.save`, which copies every tensor to
    bytes and then the whole file into one buffer: twice the weights + AdamW state (+3.2 GB for
    SmolLM2) at save time. Same layout as safetensors' own `prepare`: tensors sorted by dtype
    size (descending) then name, compact JSON header padded with spaces to 8 bytes, and DCP's
    metadata (every tensor whole: offsets 0)."""
    info = {k: {"saved_offsets": [0] * t.ndim} for k, t in tensors.items()}
    header: dict[str, Any] = {
        "__metadata__": {
            "DCP_SHARDING_INFO": json.dumps(info),
            "DCP_VERSION": "1.0",
            "format": "pt",
        }
    }
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _SAFETENSORS_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            f.write(tensors[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def _export_hf(
    out: Path,
    weights: dict[str, torch.Tensor],
    *,
    hf_model: Any,
    peft_model: Any,
    cfg: Config,
    merged: bool = True,
) -> None:
    with quiet_transformers():  # no "Writing model shards" bar under ours
        _export_hf_files(
            out, weights, hf_model=hf_model, peft_model=peft_model, cfg=cfg, merged=merged
        )


def _export_hf_files(
    out: Path,
    weights: dict[str, torch.Tensor],
    *,
    hf_model: Any,
    peft_model: Any,
    cfg: Config,
    merged: bool = True,
) -> None:
    if peft_model is None:
        hf_model.save_pretrained(out, state_dict=weights, safe_serialization=True)
        return
    lora.save_adapter(peft_model, weights, out / lora.ADAPTER)
    if merged:
        lora.export_merged(out / lora.ADAPTER, cfg, out)


def _train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable weights and optimizer state, sharded as they live (DTensors under FSDP2)."""
    msd, osd = get_state_dict(model, optimizer, options=_SHARDED)
    # ignore_frozen_params misses a frozen tied alias (the LoRA lm_head): drop it here too, and
    # keep a trainable tied weight once (safetensors refuses two names for one storage).
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    skip = frozen | tied_aliases(model)
    return {k: v for k, v in msd.items() if k not in skip}, osd


def _flat_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(model sd, optimizer sd, tensors, json): the trainer state of `_train_state` split for
    pickle-free storage. ``tensors`` (this rank's DTensors under FSDP2) go to DCP under flat
    names, ``model.<fqn>`` and ``optim.state.<fqn>.<name>``; ``json`` holds the optimizer's
    param_groups and any non-tensor per-parameter state, the same on every rank."""
    msd, osd = _train_state(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in msd.items():
        if not torch.is_tensor(v):
            raise TypeError(f"model state {k!r} is a {type(v).__name__}, not a tensor")
        tensors[f"model.{k}"] = v
    other: dict[str, dict[str, Any]] = {}
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.state.{fqn}.{name}"] = v
            else:
                other.setdefault(fqn, {})[name] = v
    rest = {"param_groups": osd["param_groups"], "state": other}
    json.dumps(rest)  # fail here, on every rank alike, if something is not JSON
    return msd, osd, tensors, rest


def _restore_optim(osd: dict, tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict:
    """The nested optimizer state dict: tensors as DCP loaded them, the rest from JSON."""
    other = saved.get("state", {})
    state = {
        fqn: {
            name: tensors[f"optim.state.{fqn}.{name}"] if torch.is_tensor(v) else other[fqn][name]
            for name, v in st.items()
        }
        for fqn, st in osd["state"].items()
    }
    groups = saved["param_groups"]
    if len(groups) != len(osd["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(groups)} optimizer param groups, the optimizer "
            f"{len(osd['param_groups'])}"
        )
    # JSON turns tuples (AdamW's betas) into lists: give them back their type.
    groups = [
        {k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()}
        for g, cur in zip(groups, osd["param_groups"], strict=True)
    ]
    return {"state": state, "param_groups": groups}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint ``path``: step, data position, schedule, metrics."""
    return json.loads((path / TRAINER_STATE).read_text())


def load_trainer_state(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from ``path`` in place; return trainer_state.

    Collective; resharded to this run's world size by torch.distributed.checkpoint."""
    state = read_trainer_state(path)
    if "optimizer" not in state or (path / DCP_DIR / ".metadata").exists():
        raise InputError(
            "written by an older ssrengine (pickled torch.distributed.checkpoint state) and not "
            "loaded: remove the run's checkpoints/ to train from scratch",
            file=str(path),
        )
    inner = distributed.unwrap(model)
    msd, osd, tensors, _ = _flat_state(inner, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(
            tensors,
            storage_reader=HuggingFaceStorageReader(str(path / DCP_DIR)),
            no_dist=distributed.init().size == 1,
        )
    set_state_dict(
        inner,
        optimizer,
        model_state_dict={k: tensors[f"model.{k}"] for k in msd},
        optim_state_dict=_restore_optim(osd, tensors, state["optimizer"]),
        options=_SHARDED,
    )
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / RNG))
    torch.set_rng_state(rng["torch"])
    device = distributed.init().device
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state
