"""Checks of a Hugging Face model directory's files before transformers reads them.

transformers and safetensors report a broken directory with a traceback from deep inside
(``SafetensorError: Error while deserializing header``, ``OSError: ... is not a valid JSON
file``) or by naming none of the files. These checks name the broken file in one line. They are
cheap: JSON files are parsed and a safetensors file's header is read, never its tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ssrengine.core.errors import InputError
from ssrengine.core.io import read_json

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# A tokenizer needs one of these (fast tokenizer, sentencepiece, or BPE vocab + merges).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def check_safetensors(path: Path) -> None:
    """The file is whole: its header parses and the data it describes ends at end of file.

    Layout (huggingface/safetensors, docs "Format"): u64 little-endian header size N, N bytes of
    JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?}``, then the data
    buffer, whose size must equal the largest ``end`` (safetensors/src/tensor.rs checks the same
    and reports MetadataIncompleteBuffer)."""
    if not path.is_file():
        raise InputError("weights file not found", file=str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"truncated safetensors file ({size} bytes)", file=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise InputError(
                f"not a safetensors file or truncated: header of {n} bytes in a {size}-byte file",
                file=str(path),
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise InputError(
            f"corrupt safetensors header ({type(e).__name__})", file=str(path)
        ) from None
    have, want = size - 8 - n, max(ends, default=0)
    if have != want:
        raise InputError(
            f"truncated or damaged: its header describes {want} bytes of tensors, the file holds "
            f"{have}",
            file=str(path),
        )


def check_model_files(model_dir: Path) -> None:
    """config.json parses and the weights are present and whole (safetensors)."""
    config = read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise InputError("expected a JSON object", file=str(model_dir / "config.json"))
    if (model_dir / SAFETENSORS).exists():
        check_safetensors(model_dir / SAFETENSORS)
    elif (model_dir / SAFETENSORS_INDEX).exists():
        index = model_dir / SAFETENSORS_INDEX
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError("no 'weight_map' object", file=str(index))
        for shard in sorted(set(weight_map.values())):
            check_safetensors(model_dir / str(shard))
    elif not (model_dir / TORCH_BIN).exists() and not (model_dir / TORCH_BIN_INDEX).exists():
        raise InputError(
            f"no weights file: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}",
            file=str(model_dir),
        )


def check_tokenizer_files(model_dir: Path) -> None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"no tokenizer files: expected one of {', '.join(TOKENIZER_FILES)}",
            file=str(model_dir),
        )
    for name in TOKENIZER_JSON:
        if (model_dir / name).is_file():
            read_json(model_dir / name)


def load_error(what: str, model_dir: Path, e: BaseException) -> InputError:
    """An upstream loading failure the checks above did not foresee, as one line."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return InputError(f"cannot load the {what}: {type(e).__name__}: {first}", file=str(model_dir))
