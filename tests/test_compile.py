"""train.compile: compiled decoder layers train to the same losses as eager (fp32), save fewer
activations under train.compile_memory_budget, and steps whose packed rows differ in length
reuse the first step's graphs."""

import pytest
import torch

from ssrengine import trainer
from ssrengine.io import read_rows
from tests.test_trainer import _cfg, rehearsal


@pytest.mark.slow  # inductor compiles forward and backward: minutes on 2 cores
def test_compiled_layers_give_eager_losses(tiny_model_dir, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs_after_step: list[int] = []
    step = trainer.train_step

    def counting_step(tr):
        out = step(tr)
        graphs_after_step.append(counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(trainer, "train_step", counting_step)
    losses = {}
    for flag in ("false", "true"):
        cfg = _cfg(
            tiny_model_dir, tmp_path / flag, "--train.max_steps=3", f"--train.compile={flag}"
        )
        trainer.train(cfg, tmp_path / flag, rows=rehearsal())
        losses[flag] = [r["loss"] for r in read_rows(tmp_path / flag / "metrics.jsonl")]
    eager, compiled = graphs_after_step[:3], graphs_after_step[3:]
    assert eager == [0, 0, 0]
    # The first step compiles (the attention is an eager island: graphs before and after it);
    # later steps, other lengths and other numbers of packed examples, compile nothing new.
    assert compiled[0] > 0
    assert compiled == [compiled[0]] * 3, compiled
    rows = read_rows(tmp_path / "true" / "metrics.jsonl")
    assert len({r["tokens"] for r in rows}) > 1  # the steps' packed rows differ in length
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4, abs=1e-5)
