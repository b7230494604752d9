"""Models whose logits are not hidden @ lm_head.T: a logit scale (Cohere, Granite) is folded
into the hidden states `hidden_and_head` returns; an lm_head bias (Phi) and a final softcap
(Gemma-2) go to the fused loss as its ``bias`` and ``softcap`` (`head_bias_and_softcap`), so
the loss and the scorer see the model's own logits; an unknown transform is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

from ssrengine.core.errors import InputError
from ssrengine.kernels import sequence_log_likelihood
from ssrengine.models.loading import head_bias_and_softcap, hidden_and_head
from ssrengine.training.batching import MicroBatch
from ssrengine.training.loss import loss_sum

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def _model(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    return model, ids


MODELS = [
    (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.25}),
    (transformers.GraniteConfig, transformers.GraniteForCausalLM, {"logits_scaling": 8.0}),
    (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {"head_dim": 8, "final_logit_softcapping": 0.2},  # small: the cap bends the logits
    ),
    (transformers.PhiConfig, transformers.PhiForCausalLM, {}),  # lm_head with a bias
]
IDS = ["cohere-logit_scale", "granite-logits_scaling", "llama", "gemma2-softcap", "phi-bias"]


def _logits(model, ids):
    hidden, weight = hidden_and_head(model, ids)
    bias, softcap = head_bias_and_softcap(model)
    z = torch.nn.functional.linear(hidden, weight, bias)
    return softcap * torch.tanh(z / softcap) if softcap else z


@pytest.mark.parametrize("config_cls,model_cls,extra", MODELS, ids=IDS)
def test_hidden_head_bias_and_softcap_give_the_models_logits(config_cls, model_cls, extra):
    model, ids = _model(config_cls, model_cls, **extra)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "final_logit_softcapping" in extra:  # the test shows something: the cap bends them
        raw = torch.nn.functional.linear(*hidden_and_head(model, ids)).detach()
        assert (raw - want).abs().max() > 0.02
    if model_cls is transformers.PhiForCausalLM:
        assert head_bias_and_softcap(model)[0] is model.lm_head.bias


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("config_cls,model_cls,extra", MODELS[3:], ids=IDS[3:])
def test_training_loss_and_scores_use_the_models_logits(config_cls, model_cls, extra, impl):
    """loss_sum (fused or naive) and the scorer equal cross-entropy of the model's own logits,
    and the gradients reach the lm_head's bias."""
    model, ids = _model(config_cls, model_cls, **extra)
    labels = ids.clone()
    labels[0, :4] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    n_sup = int((shifted != -100).sum())
    mb = MicroBatch(ids, shifted, {}, supervised_tokens=n_sup, real_tokens=ids.numel(), ids=["0"])
    loss = loss_sum(model, mb, impl=impl)
    logits = model(input_ids=ids, use_cache=False).logits.reshape(-1, TINY["vocab_size"])
    want = torch.nn.functional.cross_entropy(logits, shifted.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    head = [p for p in (model.lm_head.weight, model.lm_head.bias) if p is not None]
    got_grads = torch.autograd.grad(loss, head, retain_graph=True)
    for g_loss, g_want in zip(got_grads, torch.autograd.grad(want, head), strict=True):
        torch.testing.assert_close(g_loss, g_want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        hidden, weight = hidden_and_head(model, ids)
        bias, softcap = head_bias_and_softcap(model)
        cu = torch.tensor([0, ids.shape[1]])
        scores = sequence_log_likelihood(
            hidden[0], weight, shifted[0], cu, bias=bias, softcap=softcap
        )
    torch.testing.assert_close(scores.logprob_sum[0], -want.detach(), rtol=1e-5, atol=1e-5)


def test_an_unknown_scale_attribute_is_refused():
    model, ids = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    model.config.logits_scaling = 4.0  # a model type whose use of it is not known here
    with pytest.raises(InputError, match=r"'llama'.*logits_scaling"):
        hidden_and_head(model, ids)
