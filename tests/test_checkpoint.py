"""Checkpoints hold no pickle: `pickled_files` scans a directory; the trainer, LoRA and
distributed tests run it on the checkpoints they write. Here: the scan itself catches every
way torch pickles (pickle, torch.save, DCP's default `.metadata` and `.distcp` files)."""

import json
import pickle
import pickletools
import struct
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

# Protocols 2-5 start with PROTO (0x80) and the protocol number.
PICKLE_HEADERS = {bytes([0x80, p]) for p in range(2, 6)}


def pickled_files(root: Path) -> list[str]:
    """Files under ``root`` that are, or may hide, a pickle: a protocol 2-5 header, a zip
    (torch.save), a whole protocol 0/1 opcode stream, or anything but safetensors, UTF-8 text
    and, for `*.json` and DCP's `.metadata`, valid JSON. Returns ``path: reason`` lines."""
    bad = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        why = _not_pickle_free(f, f.read_bytes())
        if why:
            bad.append(f"{f.relative_to(root)}: {why}")
    return bad


def _not_pickle_free(f: Path, data: bytes) -> str | None:
    if data[:2] in PICKLE_HEADERS:
        return "pickle"
    if data[:4] == b"PK\x03\x04":
        return "zip archive (torch.save)"
    if f.suffix == ".safetensors":
        return None if _is_safetensors(data) else "not a safetensors file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary, not safetensors"
    if f.suffix == ".json" or f.name == ".metadata":
        try:
            json.loads(text)
        except ValueError:
            return "not JSON"
    if _is_pickle_stream(data):
        return "pickle (text protocol)"
    return None


def _is_safetensors(data: bytes) -> bool:
    """An 8-byte header length, a JSON header, then exactly the tensor bytes it describes."""
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return len(data) == 8 + n + max(ends, default=0)


def _is_pickle_stream(data: bytes) -> bool:
    """Parsed, never loaded: the whole file is one opcode stream ending in STOP."""
    try:
        *_, (op, _, pos) = pickletools.genops(data)
    except Exception:
        return False
    return op.name == "STOP" and pos == len(data) - 1


def test_scan_flags_pickles_and_passes_safetensors_json_text(tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    obj = {"lr": 1e-3, "betas": (0.9, 0.95)}
    for proto in range(6):
        (bad / f"p{proto}.bin").write_bytes(pickle.dumps(obj, protocol=proto))
    torch.save({"w": torch.ones(2)}, bad / "model.pt")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"w": torch.ones(3), "step": 5}, checkpoint_id=str(bad / "dcp"), no_dist=True)
    flagged = {line.split(":")[0] for line in pickled_files(bad)}
    expected = {p.relative_to(bad).as_posix() for p in bad.rglob("*") if p.is_file()}
    assert ".metadata" in {Path(p).name for p in expected}
    assert flagged == expected

    save_file({"w": torch.ones(2, 3), "step": torch.tensor(4.0)}, good / "a.safetensors")
    save_file({}, good / "empty.safetensors")
    (good / "state.json").write_text(json.dumps(obj))
    (good / "chat_template.jinja").write_text("{% for m in messages %}{{ m }}{% endfor %}")
    (good / "README.md").write_text("# adapter\n")
    assert pickled_files(good) == []
