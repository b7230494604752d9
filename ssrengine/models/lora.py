"""LoRA through peft (the SSR/S3FT papers' setting: Mistral-7B-Instruct, r = 8).

`apply` injects adapters into the transformers model in place: the trainer keeps using the
same model object (with LoRA layers inside) for `hidden_and_head`, so the fused loss and the
FSDP2/DDP wrapping are the same as for full fine-tuning; only the trainable set differs.

A LoRA checkpoint step-N/ is still an HF directory `from_pretrained` (and SGLang) load: the
adapter merged into the base weights. The adapter itself is in step-N/adapter/ (peft format:
adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.config import Config, TrainConfig
from ssrengine.core.errors import InputError

# The prefix peft puts in front of the wrapped transformers model's parameter names.
PEFT_PREFIX = "base_model.model."


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


@contextmanager
def _quiet() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: not our warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield
