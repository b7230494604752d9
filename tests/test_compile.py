"""train.compile: compiled decoder blocks train to the same losses as eager (fp32)."""

import pytest

from ssrengine.io import read_rows
from ssrengine.trainer import train
from tests.test_trainer import _cfg, rehearsal


@pytest.mark.slow  # inductor compiles forward and backward: minutes on 2 cores
def test_compiled_blocks_give_eager_losses(tiny_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    losses = {}
    for flag in ("false", "true"):
        cfg = _cfg(
            tiny_model_dir, tmp_path / flag, "--train.max_steps=3", f"--train.compile={flag}"
        )
        train(cfg, tmp_path / flag, rows=rehearsal())
        losses[flag] = [r["loss"] for r in read_rows(tmp_path / flag / "metrics.jsonl")]
    assert counters["stats"]["unique_graphs"] > 0  # the blocks were compiled
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4, abs=1e-5)
