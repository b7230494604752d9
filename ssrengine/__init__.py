"""ssrengine: Selective Self-Rehearsal fine-tuning.

The Python API mirrors the command line: each function takes a config — a `Config`, a TOML
file, or a dict of sections — and does what ``python -m ssrengine COMMAND`` does, into
run.dir, resuming and refusing exactly as the command does::

    import ssrengine

    cfg = ssrengine.load_config("configs/demo.toml", ["--run.dir=runs/mine"])
    checkpoint = ssrengine.run(cfg)          # generate → judge → build → train
    ssrengine.export(cfg.run.dir)            # TRL prompt-completion JSONL (+ datasets dir)

Importing the package loads no model library; each function imports what it needs.
"""

from __future__ import annotations

# The standard library under private names: `import ssrengine` shows only the API (`__all__`).
import os as _os
import sys as _sys
import types as _types
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ssrengine.core.config import Config
from ssrengine.core.config_load import build_config as _build_config
from ssrengine.core.config_load import load_config
from ssrengine.data.records import IGNORE_INDEX
from ssrengine.training.callbacks import Callback

if _TYPE_CHECKING:
    from pathlib import Path

    from ssrengine.core.rundir import BuildStats, GenerationRow
    from ssrengine.rehearsal.judge import Verdict

__version__ = "0.1.0"

ConfigLike = Config | str | _os.PathLike[str] | _Mapping[str, _Any]

__all__ = [
    "IGNORE_INDEX",
    "Callback",
    "Config",
    "ConfigLike",
    "build",
    "export",
    "generate",
    "judge",
    "load_config",
    "render",
    "run",
    "train",
]


def __dir__() -> list[str]:
    """dir(ssrengine): the API, not the modules and names it is built from."""
    return sorted([*__all__, "__version__"])


def _config(config: ConfigLike) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, _Mapping):
        return _build_config(dict(config), source="<dict>")
    return load_config(config)


def run(config: ConfigLike, *, resume: bool = False, callbacks: _Sequence[Callback] = ()) -> Path:
    """Every stage into run.dir, skipping finished work; returns the final checkpoint.
    ``callbacks``: training callbacks (`Callback`), called after train.callbacks'."""
    from ssrengine.pipeline import run_all
    from ssrengine.training.callbacks import registered

    with registered(callbacks):
        return run_all(_config(config), resume=resume)


def generate(config: ConfigLike) -> dict[str, GenerationRow]:
    """The base model's answer to every training prompt (generations.jsonl), by example id."""
    from ssrengine.pipeline import run_stage

    return run_stage(_config(config), "generate") or {}


def judge(config: ConfigLike) -> dict[str, Verdict]:
    """The judge's verdict on every generation (verdicts.jsonl), by example id."""
    from ssrengine.pipeline import run_stage

    return run_stage(_config(config), "judge") or {}


def build(config: ConfigLike) -> BuildStats:
    """rehearsal.jsonl (accepted own answers + gold for the rest) and its source counts."""
    from ssrengine.pipeline import run_stage

    return run_stage(_config(config), "build")


def train(config: ConfigLike, *, resume: bool = False, callbacks: _Sequence[Callback] = ()) -> Path:
    """Fine-tune on rehearsal.jsonl; returns the final checkpoint directory.
    ``callbacks``: training callbacks (`Callback`), called after train.callbacks'."""
    from ssrengine.pipeline import run_stage
    from ssrengine.training.callbacks import registered

    with registered(callbacks):
        return run_stage(_config(config), "train", resume=resume)


def export(
    run_dir: str | _os.PathLike[str],
    fmt: str = "trl",
    out: str | None = None,
    *,
    checkpoint: str | None = None,
) -> Path:
    """A run's rehearsal set for another trainer (``fmt="trl"``) or a checkpoint as an HF
    model directory (``fmt="hf"``, LoRA merged; ``checkpoint``: step-N or best, default the
    newest) (see ssrengine.export); returns its directory."""
    from ssrengine.export import export as export_run

    return export_run(run_dir, fmt, out, checkpoint=checkpoint)


def render(config: ConfigLike, n: int = 3, *, tokens: bool = False) -> str:
    """The first ``n`` training prompts as the model sees them, supervised span marked."""
    from ssrengine.render import render as render_examples

    return render_examples(_config(config), n, tokens=tokens)


class _Package(_types.ModuleType):
    """Keeps the API functions bound on the package: importing a submodule of the same name
    (ssrengine.train, ssrengine.export, ssrengine.render) would otherwise rebind
    ``ssrengine.train`` to that module. The modules stay importable by their full names
    (``from ssrengine.export import export``, ``python -m ssrengine.train``)."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_API = frozenset({"run", "generate", "judge", "build", "train", "export", "render"})
_sys.modules[__name__].__class__ = _Package
