"""Models whose logits are not hidden @ lm_head.T: a logit scale (Cohere, Granite) is folded
into the hidden states `hidden_and_head` returns, so the fused loss sees the model's own
logits; a transform that is not a scale (Gemma's tanh softcapping) is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

from ssrengine.core.errors import InputError
from ssrengine.models.loading import hidden_and_head

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def _model(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    return model, ids


@pytest.mark.parametrize(
    "config_cls,model_cls,extra",
    [
        (transformers.CohereConfig, transformers.CohereForCausalLM, {"logit_scale": 0.25}),
        (transformers.GraniteConfig, transformers.GraniteForCausalLM, {"logits_scaling": 8.0}),
        (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    ],
    ids=["cohere-logit_scale", "granite-logits_scaling", "llama"],
)
def test_hidden_times_head_is_the_models_logits(config_cls, model_cls, extra):
    model, ids = _model(config_cls, model_cls, **extra)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        hidden, weight = hidden_and_head(model, ids)
    torch.testing.assert_close(hidden @ weight.T, want, rtol=1e-5, atol=1e-5)


def test_logit_softcapping_is_refused_naming_the_model_type():
    model, ids = _model(
        transformers.Gemma2Config, transformers.Gemma2ForCausalLM, head_dim=8,
        final_logit_softcapping=30.0,
    )  # fmt: skip
    with pytest.raises(InputError, match=r"'gemma2'.*final_logit_softcapping = 30\.0"):
        hidden_and_head(model, ids)


def test_an_unknown_scale_attribute_is_refused():
    model, ids = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    model.config.logits_scaling = 4.0  # a model type whose use of it is not known here
    with pytest.raises(InputError, match=r"'llama'.*logits_scaling"):
        hidden_and_head(model, ids)
