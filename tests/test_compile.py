"""train.compile: compiled decoder layers train to the same losses as eager, and steps whose
packed rows differ in length reuse the first step's graphs: on the CPU (fp32, sdpa_varlen as
an eager island) and on a GPU (bf16 autocast, sdpa_varlen or FlashAttention-2 traced)."""

import pytest
import torch

from ssrengine.core.io import read_rows
from ssrengine.training import trainer
from tests.test_trainer import _cfg, rehearsal


def _eager_and_compiled(tiny, tmp_path, monkeypatch, *extra):
    """Losses of three steps eager and compiled, and the compiled graph count after each."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    step = trainer.train_step

    def counting_step(tr):
        out = step(tr)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(trainer, "train_step", counting_step)
    losses, tokens = {}, set()
    for flag in ("false", "true"):
        run = tmp_path / flag
        cfg = _cfg(tiny, run, "--train.max_steps=3", f"--train.compile={flag}", *extra)
        trainer.train(cfg, run, rows=rehearsal())
        rows = read_rows(run / "metrics.jsonl")
        losses[flag] = [r["loss"] for r in rows]
        tokens |= {r["tokens"] for r in rows}
    assert graphs[:3] == [0, 0, 0]  # eager compiles nothing
    assert len(tokens) > 1, tokens  # the steps' packed rows differ in length
    return losses["false"], losses["true"], graphs[3:]


@pytest.mark.slow  # inductor compiles forward and backward: about a minute on 2 cores
def test_compiled_layers_give_eager_losses(tiny_model_dir, tmp_path, monkeypatch):
    eager, compiled, graphs = _eager_and_compiled(tiny_model_dir, tmp_path, monkeypatch)
    # The first step compiles (graphs before and after the eager attention); later steps,
    # with other lengths and other numbers of packed examples, compile nothing new.
    assert graphs[0] > 0
    assert graphs == [graphs[0]] * 3, graphs
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa_varlen", "flash_attention_2"])
def test_compiled_layers_on_cuda(tiny_model_dir, tmp_path, monkeypatch, attn):
    """bf16 autocast on a GPU: FlashAttention-2 is traced into the layer's graph (its max
    lengths are ints: at most one recompile, then dynamic), sdpa_varlen stays an island."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    extra = ("--model.device=cuda", f"--model.attn_implementation={attn}")
    eager, compiled, graphs = _eager_and_compiled(tiny_model_dir, tmp_path, monkeypatch, *extra)
    assert graphs[0] > 0
    assert graphs[2] == graphs[1], graphs  # lengths vary from step 2 on: nothing new by step 3
    assert compiled == pytest.approx(eager, rel=2e-2)
