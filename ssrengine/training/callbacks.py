"""Training callbacks: your code at the trainer's events, without changing the trainer.

A callback is any object with some of these methods (`Callback` is the protocol; subclass it
or write a plain class, the missing methods are skipped):

- ``on_step_end(row)``: after each optimizer step, with its `MetricRow` (the line just written
  to metrics.jsonl: step, loss, lr, grad_norm, tokens_per_s, epoch, eval_loss, ...);
- ``on_evaluate(step, results)``: after each validation, ``results = {"eval_loss": ...}``;
- ``on_checkpoint(path)``: after each checkpoint is complete on disk (step-N, interrupted
  saves and train.keep_best's included), with its directory;
- ``on_train_end(final)``: once, the final checkpoint, or None when training stopped early
  (an interrupt or an error; close files and connections here).

They run on rank 0 only (under torchrun the other ranks have no metrics rows), in the
training process, between steps: what they return is ignored, what they raise stops training
as an error in the trainer would. Register them from Python (``ssrengine.train(cfg,
callbacks=[MyCallback()])``, the same for ``ssrengine.run``) or by name in the config:
``train.callbacks = ["python:MODULE:NAME"]``, NAME a class (built with no arguments) or an
object; MODULE is imported from the Python path or the current directory. The trackers of
train.report_to (`ssrengine.training.reporting.Reporters`) are callbacks too.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ssrengine.core.errors import InputError
from ssrengine.core.rundir import MetricRow

log = logging.getLogger(__name__)

EVENTS = ("on_step_end", "on_evaluate", "on_checkpoint", "on_train_end")


@runtime_checkable
class Callback(Protocol):
    """The events a callback may handle; every method is optional (see the module doc)."""

    def on_step_end(self, row: MetricRow) -> None: ...

    def on_evaluate(self, step: int, results: dict[str, float]) -> None: ...

    def on_checkpoint(self, path: Path) -> None: ...

    def on_train_end(self, final: Path | None) -> None: ...


class Callbacks:
    """Several callbacks as one: each event goes to those that define it, in order."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, e, None)) for e in EVENTS):
                raise InputError(
                    f"{cb!r} is not a training callback: it has none of {', '.join(EVENTS)}",
                    field="train.callbacks",
                )

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if callable(fn):
                fn(*args)

    def on_step_end(self, row: MetricRow) -> None:
        self._emit("on_step_end", row)

    def on_evaluate(self, step: int, results: dict[str, float]) -> None:
        self._emit("on_evaluate", step, results)

    def on_checkpoint(self, path: Path) -> None:
        self._emit("on_checkpoint", path)

    def on_train_end(self, final: Path | None) -> None:
        self._emit("on_train_end", final)


def load_callback(spec: str) -> Any:
    """``python:MODULE:NAME`` → the callback: NAME built with no arguments when a class."""

    def bad(msg: str) -> InputError:
        return InputError(f"{spec!r}: {msg}", field="train.callbacks")

    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "python" or not all(p.strip() for p in parts[1:]):
        raise bad("expected python:MODULE:NAME (e.g. python:mycallbacks:PrintLoss)")
    _, module, attr = parts
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise bad(f"cannot import module {module!r}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise bad(f"module {module!r} has no {attr!r}")
        obj = getattr(obj, name)
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise bad(f"cannot build the callback class with no arguments: {e}") from None
    if not any(callable(getattr(obj, e, None)) for e in EVENTS):
        raise bad(f"not a training callback: it has none of {', '.join(EVENTS)}")
    return obj


def load_callbacks(specs: Sequence[str]) -> list[Any]:
    """train.callbacks, each loaded (`load_callback`)."""
    return [load_callback(s) for s in specs]


class ProgressLog:
    """Progress as plain log lines every ``every`` steps and at the last (0: about 20 lines a
    run), for a stderr that is not a terminal (a pipe, a file, a job log), where the trainer
    draws no ``\\r`` progress bar."""

    def __init__(self, total: int, every: int = 0) -> None:
        self.total = total
        self.every = every or max(1, math.ceil(total / 20))
        self.first: tuple[int, float] | None = None  # (step before the first, its start time)

    def on_step_end(self, row: MetricRow) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (row.step - 1, now - row.step_time_s)
        if row.step % self.every and row.step != self.total:
            return
        done = row.step - self.first[0]
        left = (now - self.first[1]) / done * (self.total - row.step)
        log.info(
            "step %d/%d: loss %.4f, lr %.3g, %.0f tokens/s, %s left",
            row.step,
            self.total,
            row.loss,
            row.lr,
            row.tokens_per_s,
            _duration(left),
        )


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# Callbacks given to the Python API (`ssrengine.train(cfg, callbacks=[...])`) reach the trainer
# through this context variable, so the stages in between carry no parameter for them.
_API: ContextVar[tuple[Any, ...]] = ContextVar("ssrengine_callbacks", default=())


@contextmanager
def registered(callbacks: Iterable[Any]) -> Iterator[None]:
    """Within this block the trainer also calls ``callbacks`` (after train.callbacks')."""
    token = _API.set((*_API.get(), *callbacks))
    try:
        yield
    finally:
        _API.reset(token)


def api_callbacks() -> tuple[Any, ...]:
    """The callbacks `registered` around this call."""
    return _API.get()
