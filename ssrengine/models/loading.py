"""Loading tokenizers and models (the path resolved by `ssrengine.models.fetch`).

`hidden_and_head` is the one boundary to transformers models: it returns the final hidden
states and the lm_head weight, so the loss never needs the [tokens, vocab] logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ssrengine.core.errors import InputError
from ssrengine.models import precision
from ssrengine.models.attention import (
    HOST_BOUNDS,
    SDPA_VARLEN,
    VARLEN_KWARGS,
    no_mask_building,
    packed_bounds,
    pick_attn_implementation,
    skips_mask_building,
)
from ssrengine.models.fetch import resolve_model_path
from ssrengine.models.files import check_model_files, check_tokenizer_files, load_error
from ssrengine.models.layers import first_decoder_layer


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights"...) off while we load: they would
    nest under the stage's bar. Restores the previous setting; usable as a decorator."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def read_chat_template(spec: str) -> str:
    """model.chat_template: a file holding a Jinja chat template, or the template itself."""
    p = Path(spec).expanduser()
    if "{" not in spec and len(spec) < 4096:
        if not p.is_file():
            raise InputError(
                f"{spec!r} is neither a file nor a Jinja template", field="model.chat_template"
            )
        spec = p.read_text(encoding="utf-8")
    if "{%" not in spec and "{{" not in spec:
        raise InputError("not a Jinja chat template (no {% or {{)", field="model.chat_template")
    return spec


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str = "") -> Any:
    """The tokenizer of a model; ``chat_template`` (model.chat_template) replaces its own."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(path)
    check_tokenizer_files(model_dir)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise load_error("tokenizer", model_dir, e) from None
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise InputError(
            f"tokenizer in {path!r} has no chat template; give one with model.chat_template",
            field="model.path",
        )
    return tok


@quiet_transformers()
def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    autocast: str = "auto",
    attn_device: str | None = None,
) -> Any:
    """A transformers causal LM with `dtype` weights on `device`; `autocast` is the dtype it
    will run under ("float32": none; "auto": inference's, `precision.inference_dtype`: bf16
    over fp32 weights on a GPU with bf16), which decides whether FlashAttention-2 can be used.
    The attention is chosen for ``attn_device`` (default: `device`), where the model will run:
    an FSDP2 model is loaded on the CPU and runs on a GPU. On Ampere and newer, fp32 matmuls
    may use TF32 from here on (`precision.enable_tf32`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = pick_device(device)
    model_dir = resolve_model_path(path)
    check_model_files(model_dir)  # name a broken file before transformers reads it
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    run_on = pick_device(attn_device) if attn_device is not None else dev
    if autocast == "auto":
        autocast = precision.inference_dtype(DTYPES[dtype], precision.capability(run_on))
    precision.enable_tf32(run_on)
    attn = pick_attn_implementation(
        attn_implementation, run_on, weights=dtype, autocast=autocast, config=config
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        config=config,
        dtype=DTYPES[dtype],
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
    )
    return model.to(dev)


# Models whose logits are `lm_head(hidden) * scale` (as their modeling_*.py computes them):
# model type prefix -> (config attribute, whether the scale multiplies or divides).
_LOGIT_SCALES = {"cohere": ("logit_scale", False), "granite": ("logits_scaling", True)}
# Config attributes of logit transforms the fused loss cannot express. (Gemma-2/3's
# final_logit_softcapping it can: `logit_softcap`.)
_UNSUPPORTED = ("logit_softcapping", "logit_scale", "logits_scaling")


def logit_softcap(config: Any) -> float | None:
    """The cap c of a model whose logits are c * tanh(lm_head(hidden) / c) (Gemma-2's
    ``final_logit_softcapping``, applied after the lm_head in modeling_gemma2.py and its
    successors), for the fused loss's ``softcap``; None without one."""
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(cfg, "final_logit_softcapping", None)
        if value:
            return float(value)
    return None


def logit_multiplier(config: Any) -> float:
    """The factor s with logits = s * (hidden @ lm_head.T) for this model: folded into the
    hidden states, so the fused loss (which never builds logits) sees the model's own logits.
    A transform the fused loss cannot express, or a scale attribute on a model type whose use
    of it is not known here, is refused, naming the model type."""
    kind = getattr(config, "model_type", "") or ""
    scale = 1.0
    for prefix, (attr, divides) in _LOGIT_SCALES.items():
        value = getattr(config, attr, None)
        if kind.startswith(prefix) and value is not None:
            scale = 1.0 / float(value) if divides else float(value)
    for attr in _UNSUPPORTED:
        value = getattr(config, attr, None)
        known = any(kind.startswith(p) and attr == a for p, (a, _) in _LOGIT_SCALES.items())
        if value not in (None, 0, 1, 1.0, False) and not known:
            raise InputError(
                f"model type {kind!r} transforms its logits ({attr} = {value}), which the fused "
                "cross-entropy and the scorer, computing hidden @ lm_head.T, do not support",
                field="model.path",
            )
    return scale


def head_bias_and_softcap(model: Any) -> tuple[torch.Tensor | None, float | None]:
    """The rest of the model's logits beyond `hidden_and_head`: logits =
    softcap(hidden @ weight.T + bias), for the fused loss's ``bias`` and ``softcap`` (an
    lm_head with a bias, as Phi's; Gemma-2's final softcapping). The bias carries the logit
    scale `hidden_and_head` folds into the hidden states."""
    bias = getattr(model.get_output_embeddings(), "bias", None)
    scale = logit_multiplier(model.config)
    if bias is not None and scale != 1.0:
        bias = bias * scale
    return bias, logit_softcap(model.config)


def hidden_and_head(
    model: Any, input_ids: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (B, T, H) and the lm_head weight (V, H), tied or not, with
    hidden @ weight.T = the model's logits (a logit scale is folded into the hidden states)
    before the lm_head's bias and a final softcap (`head_bias_and_softcap`)."""
    if skips_mask_building(model.config._attn_implementation, kwargs):
        # The boundaries reach the attention through a context, not the layers' kwargs: a
        # compiled layer (train.compile) would guard on them, and on the tensors' lengths.
        bounds = kwargs.pop(HOST_BOUNDS)
        if model.config._attn_implementation == SDPA_VARLEN:
            kwargs = {k: v for k, v in kwargs.items() if k not in VARLEN_KWARGS}
        with no_mask_building(model, first_decoder_layer(model)), packed_bounds(bounds):
            out = model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
    else:
        out = model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
    hidden = out.last_hidden_state
    scale = logit_multiplier(model.config)
    if scale != 1.0:
        hidden = hidden * scale
    return hidden, model.get_output_embeddings().weight
