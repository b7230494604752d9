"""train.compile: compiled norms and MLPs train to the same losses as eager (fp32), and
steps whose packed rows differ in length reuse the first step's graphs."""

import pytest
import torch

from ssrengine.io import read_rows
from ssrengine.trainer import train
from tests.test_trainer import _cfg, rehearsal


@pytest.mark.slow  # inductor compiles forward and backward: minutes on 2 cores
def test_compiled_blocks_give_eager_losses(tiny_model_dir, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # Each part compiles once for every layer and every length: a recompile is an error.
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    losses = {}
    for flag in ("false", "true"):
        cfg = _cfg(
            tiny_model_dir, tmp_path / flag, "--train.max_steps=3", f"--train.compile={flag}"
        )
        train(cfg, tmp_path / flag, rows=rehearsal())
        losses[flag] = [r["loss"] for r in read_rows(tmp_path / flag / "metrics.jsonl")]
    assert counters["stats"]["unique_graphs"] > 0  # the parts were compiled
    lengths = {r["tokens"] for r in read_rows(tmp_path / "true" / "metrics.jsonl")}
    assert len(lengths) > 1, lengths  # the steps' packed rows differ in length
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4, abs=1e-5)
