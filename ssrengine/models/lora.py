"""LoRA through peft (the SSR/S3FT papers' setting: Mistral-7B-Instruct, r = 8).

`apply` injects adapters into the transformers model in place: the trainer keeps using the
same model object (with LoRA layers inside) for `hidden_and_head`, so the fused loss and the
FSDP2/DDP wrapping are the same as for full fine-tuning; only the trainable set differs.

Every LoRA checkpoint step-N/ holds the adapter in step-N/adapter/ (peft format:
adapter_config.json + adapter_model.safetensors, for `PeftModel.from_pretrained` and SGLang
``--lora-paths``), the tokenizer and the resume state. Only the run's final checkpoint (the one
that reaches train.max_steps) is also an HF directory `from_pretrained` loads: the adapter
merged into the base weights, a full copy of the model. `hf_dir` gives any checkpoint as an HF
directory, merging an adapter-only one once into RUN/export/merged-step-N.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.config import Config, TrainConfig
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import RunDir

log = logging.getLogger(__name__)

# The prefix peft puts in front of the wrapped transformers model's parameter names.
PEFT_PREFIX = "base_model.model."
ADAPTER = "adapter"  # a checkpoint's peft adapter directory
# What an HF directory ssrengine wrote was made from (a merge: the adapter files' SHA-256, base
# model, dtype): `hf_dir` reuses a merge only while these are the same.
SOURCE = "ssrengine_source.json"
# The files of a checkpoint that are trainer state (ssrengine.training.checkpoint), not HF files.
_TRAINER_FILES = frozenset({"trainer_state.json", "rng.safetensors", "run_config.json"})
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def lora_config(t: TrainConfig) -> Any:
    """A peft LoraConfig: the flat train.lora_* keys, then train.lora_config_file's fields,
    then train.lora_config's (any LoraConfig field: DoRA, rsLoRA, modules_to_save, bias...)."""
    from peft import LoraConfig

    targets = t.lora_target_modules.strip()
    fields: dict[str, Any] = {
        "r": t.lora_r,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "target_modules": targets
        if targets == "all-linear"
        else [m.strip() for m in targets.split(",") if m.strip()],
        "bias": "none",
    }
    extra = {**_config_file(t.lora_config_file), **json.loads(t.lora_config or "{}")}
    # What a saved adapter_config.json holds beside the fields: not settings of this run.
    for key in ("base_model_name_or_path", "revision", "inference_mode", "peft_type"):
        extra.pop(key, None)
    if extra.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise InputError(
            f"task_type {extra['task_type']!r}: ssrengine trains causal LMs (CAUSAL_LM)",
            field="train.lora_config",
        )
    extra.pop("task_type", None)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(extra) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"{unknown[0]!r} is not a peft LoraConfig field{hint}", field="train.lora_config"
        )
    try:
        return LoraConfig(task_type="CAUSAL_LM", **{**fields, **extra})
    except (TypeError, ValueError) as e:
        raise InputError(f"peft refused it: {e}", field="train.lora_config") from None


def _config_file(path: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        value = json.loads(Path(path).read_text())
    except OSError as e:
        raise InputError(f"cannot read it: {e.strerror}", file=path) from None
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=path, line=e.lineno) from None
    if not isinstance(value, dict):
        raise InputError("expected a JSON object of LoraConfig fields", file=path)
    return value


def apply(model: Any, t: TrainConfig) -> Any:
    """Wrap ``model`` in a peft model (adapters injected in place; base weights frozen).

    Adapter initialization draws from torch's RNG: every rank seeds it identically, so FSDP2
    ranks (which do not broadcast) hold one consistent model."""
    from peft import get_peft_model

    with _quiet():
        return get_peft_model(model, lora_config(t))


def save_adapter(peft_model: Any, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Write the adapter (peft format) from a full state dict keyed like the transformers model."""
    sd = {PEFT_PREFIX + k: v for k, v in state_dict.items()}
    peft_model.save_pretrained(str(out), state_dict=sd, safe_serialization=True)


def export_merged(adapter_dir: Path, cfg: Config, out: Path) -> None:
    """Base model (model.path, on the CPU) + adapter → merge_and_unload → HF directory ``out``.

    Reloads the adapter from disk, so a merged export also proves the adapter is loadable."""
    from peft import PeftModel

    from ssrengine.models.loading import load_model

    base = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device="cpu",
        attn_implementation="eager",  # merging runs no attention; eager loads every model
        trust_remote_code=cfg.model.trust_remote_code,
    )
    with _quiet():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)


def has_hf_weights(path: Path) -> bool:
    """Whether ``path`` holds config.json and weights: a directory `from_pretrained` loads."""
    return (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)


def is_adapter_only(checkpoint: Path) -> bool:
    """A LoRA checkpoint without the merged model (every one but a run's final checkpoint)."""
    return (checkpoint / ADAPTER / "adapter_config.json").is_file() and not has_hf_weights(
        checkpoint
    )


def hf_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's own files of an HF directory: its top-level files but the trainer
    state (the HF export where there is one, the tokenizer and chat template always)."""
    return sorted(f for f in checkpoint.iterdir() if f.is_file() and f.name not in _TRAINER_FILES)


def checkpoint_config(checkpoint: Path) -> Config:
    """The config a checkpoint was trained under (its run_config.json), code settings dropped."""
    from ssrengine.core.config_load import config_from_json

    path = checkpoint / "run_config.json"
    if not path.is_file():
        raise InputError("missing: not an ssrengine checkpoint", file=str(path))
    return config_from_json(path, warn=False)


def merged_dir(checkpoint: Path) -> Path:
    """Where `hf_dir` merges ``checkpoint`` (RUN/checkpoints/NAME): RUN/export/merged-NAME."""
    return RunDir(checkpoint.parent.parent).export(f"merged-{checkpoint.name}")


def hf_dir(checkpoint: Path, cfg: Config | None = None) -> Path:
    """An HF directory `from_pretrained` loads with the weights of ``checkpoint``.

    The checkpoint itself when it holds config.json + weights (full fine-tuning; the final
    checkpoint of a LoRA run). Otherwise its adapter is merged into the base model of ``cfg``
    (default: the checkpoint's run_config.json) once, into `merged_dir` (written to a temp
    dir, then renamed: it exists only when complete), and reused while the adapter, the base
    model and model.dtype are the ones it was merged from."""
    if has_hf_weights(checkpoint):
        return checkpoint
    if not (checkpoint / ADAPTER / "adapter_config.json").is_file():
        raise InputError(
            "neither an HF model (config.json + weights) nor a LoRA adapter (adapter/)",
            file=str(checkpoint),
        )
    cfg = cfg if cfg is not None else checkpoint_config(checkpoint)
    out = merged_dir(checkpoint)
    source = _merge_source(checkpoint, cfg)
    if has_hf_weights(out) and _read_json(out / SOURCE) == source:
        log.info("%s: LoRA adapter only; its merged model: %s", checkpoint, out)
        return out
    log.info("%s: LoRA adapter only; merging it into %s ...", checkpoint, out)
    return merge_checkpoint(checkpoint, cfg, out)


def merge_checkpoint(checkpoint: Path, cfg: Config, out: Path) -> Path:
    """The adapter of ``checkpoint`` merged into ``cfg``'s base model, with the checkpoint's
    tokenizer, as HF directory ``out`` (written beside it under a temp name, then renamed: an
    earlier ``out`` is replaced only by a complete one)."""
    from ssrengine.models.loading import quiet_transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with quiet_transformers():
            export_merged(checkpoint / ADAPTER, cfg, tmp)
        for f in hf_files(checkpoint):
            if not (tmp / f.name).exists():  # the tokenizer and chat template
                shutil.copy2(f, tmp / f.name)
        source = _merge_source(checkpoint, cfg)
        (tmp / SOURCE).write_text(json.dumps(source, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merge_source(checkpoint: Path, cfg: Config) -> dict[str, Any]:
    adapter = checkpoint / ADAPTER
    return {
        "checkpoint": checkpoint.name,
        "adapter_sha256": {f.name: _sha256(f) for f in sorted(adapter.iterdir()) if f.is_file()},
        "base_model": cfg.model.path,
        "dtype": cfg.model.dtype,
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _quiet() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: not our warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield
