"""The trainer's loss goes through the fused kernel: same loss and gradients as full logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.core.config_load import load_config
from ssrengine.core.rundir import RehearsalRow
from ssrengine.training.batching import encode_rows, padded_batch
from ssrengine.training.loss import accumulate
from tests.tiny import records


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_untied_model_dir"])
def test_fused_loss_matches_plain_cross_entropy(request, fixture, impl):
    model_dir = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [
        RehearsalRow.from_json({**r, "target": r["response"], "source": "gold"}, "test")
        for r in records(6)
    ]
    enc = encode_rows(rows, tok, load_config().data)
    mbs = [padded_batch(enc[:4], tok.pad_token_id), padded_batch(enc[4:], tok.pad_token_id)]
    out = {}
    for name in ("naive", impl):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        total, n = accumulate(model, mbs, impl=name)
        out[name] = (total / n, {k: p.grad.clone() for k, p in model.named_parameters()})
    (loss_ref, g_ref), (loss, g) = out["naive"], out[impl]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for k in g_ref:
        torch.testing.assert_close(
            g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
