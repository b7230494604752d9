"""Training metrics to experiment trackers (train.report_to); metrics.jsonl stays the record.

``tensorboard``: torch's `SummaryWriter` under run.dir/tensorboard, scalars ``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``eval/loss``. ``wandb`` and
``trackio``: one run named after run.dir, the resolved config attached, the same names.
A tracker asked for but not installed stops the run before training with one line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ssrengine.core.config import Config
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import MetricRow, RunDir

# tracker -> the package (and module) it needs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
PROJECT = "ssrengine"


def check(names: tuple[str, ...]) -> None:
    """Every tracker in ``names`` is importable, else one InputError naming the package."""
    for name in names:
        pkg = PACKAGES[name]
        if importlib.util.find_spec(pkg) is None:
            raise InputError(
                f"{name!r} needs the {pkg} package, which is not installed (pip install {pkg})",
                field="train.report_to",
            )


def scalars(row: MetricRow) -> dict[str, float]:
    """A metrics.jsonl row as tracker scalars."""
    out = {
        "train/loss": row.loss,
        "train/lr": row.lr,
        "train/grad_norm": row.grad_norm,
        "train/tokens_per_s": row.tokens_per_s,
        "train/epoch": float(row.epoch),
    }
    if row.eval_loss is not None:
        out["eval/loss"] = row.eval_loss
    return out


class Reporters:
    """The trackers of train.report_to, a training callback (`ssrengine.training.callbacks`):
    each metrics row on step end, closed at train end."""

    def __init__(self, cfg: Config, run_dir: Path, *, start_step: int = 0) -> None:
        """``start_step``: the step training starts from (the resumed checkpoint's, else 0)."""
        names = cfg.train.report_to
        check(names)
        self._tb: Any = None
        self._runs: list[Any] = []  # wandb / trackio modules with a run open
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of steps >= start_step already in the directory (a
            # run killed after its last checkpoint, or a training before this one that was
            # deleted but for tensorboard/): one point per step, as metrics.jsonl has.
            self._tb = SummaryWriter(
                log_dir=str(RunDir(Path(run_dir)).tensorboard), purge_step=start_step
            )
        for name in ("wandb", "trackio"):
            if name in names:
                mod = importlib.import_module(name)
                kwargs = {"dir": str(run_dir)} if name == "wandb" else {}
                mod.init(project=PROJECT, name=Path(run_dir).name, config=cfg.to_dict(), **kwargs)
                self._runs.append(mod)

    def log(self, row: MetricRow) -> None:
        values = scalars(row)
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, row.step)
            self._tb.flush()  # a crashed run keeps its curves
        for mod in self._runs:
            mod.log(values, step=row.step)

    def on_step_end(self, row: MetricRow) -> None:
        self.log(row)

    def on_train_end(self, final: Path | None) -> None:
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for mod in self._runs:
            mod.finish()
