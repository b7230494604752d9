"""Checkpoints: an HF directory `from_pretrained` loads, plus trainer state without pickle.

```
checkpoints/step-N/
  config.json, model.safetensors, tokenizer files   (save_pretrained)
  run_config.json        the resolved ssrengine config
  trainer_state.json     step, scheduler, optimizer param groups, metrics summary
  optimizer.safetensors  AdamW moments, flattened as state.{param_index}.{name}
  rng.safetensors        torch (and CUDA) RNG state
```
A checkpoint is written to a temp dir and renamed, so ``step-N`` exists only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssrengine.config import Config

STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _optimizer_tensors(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "scheduler": sched, "param_groups": groups, **extra}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for s, p in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        if s != step:
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_trainer_state(
    path: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from ``path`` in place; return trainer_state."""
    from safetensors.torch import load_model

    state = json.loads((path / "trainer_state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    # Tied embeddings are stored once; anything else missing is a real mismatch.
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})"
        )
    _load_optimizer(
        optimizer, load_file(str(path / "optimizer.safetensors")), state["param_groups"]
    )
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state
