import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine import IGNORE_INDEX
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import RehearsalRow
from ssrengine.training.batching import encode_rows, micro_batches
from ssrengine.training.loss import accumulate
from ssrengine.training.loss_weights import example_weights, weighted
from tests.tiny import records

SOURCES = ("self", "paraphrase", "prefix", "gold")


def _rows(n=8):
    return [
        RehearsalRow.from_json(
            {**r, "target": r["response"], "source": SOURCES[i % 4]}, "test"
        )
        for i, r in enumerate(records(n))
    ]  # fmt: skip


def _train(*extra):
    return load_config(
        None,
        ["--train.micro_batch_size=3", "--train.max_tokens=160", "--data.max_seq_len=160", *extra],
    )


def test_example_weights_by_source_and_decision_tokens():
    t = _train("--train.loss_weight_gold=0.5", "--train.decision_tokens=2",
               "--train.decision_weight=3").train  # fmt: skip
    labels = [IGNORE_INDEX] * 3 + [11, 12, 13, 14]
    assert example_weights(labels, "gold", t) == [0, 0, 0, 1.5, 1.5, 0.5, 0.5]
    assert example_weights(labels, "self", t) == [0, 0, 0, 3.0, 3.0, 1.0, 1.0]
    assert weighted(t) and not weighted(_train().train)
    with pytest.raises(InputError, match=r"train\.loss_weight_self"):
        _train("--train.loss_weight_self=-1")


def _step(tiny_model_dir, cfg, impl, *, packing):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_rows(_rows(), tok, cfg.data)
    train = cfg.train.__class__(**{**cfg.train.__dict__, "packing": packing})
    mbs = micro_batches(enc, train, epoch=0, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    total, norm = accumulate(model, mbs, impl=impl)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return mbs, float(total / norm), grads, model, enc


@pytest.mark.parametrize("packing", [False, True])
def test_equal_weights_give_exactly_the_unweighted_step(tiny_model_dir, packing):
    plain = _step(tiny_model_dir, _train(), "torch", packing=packing)
    equal = _step(tiny_model_dir, _train(*[f"--train.loss_weight_{s}=2.5" for s in SOURCES]),
                  "torch", packing=packing)  # fmt: skip
    assert all(mb.token_weights is None for mb in plain[0])
    assert all(mb.token_weights is not None for mb in equal[0])
    assert equal[1] == pytest.approx(plain[1], rel=1e-6)
    for k in plain[2]:
        torch.testing.assert_close(equal[2][k], plain[2][k], rtol=1e-5, atol=1e-7)


def test_weighted_step_is_the_weighted_token_mean_in_any_batching(tiny_model_dir):
    cfg = _train("--train.loss_weight_gold=0.25", "--train.loss_weight_self=2",
                 "--train.decision_tokens=3", "--train.decision_weight=4")  # fmt: skip
    padded = _step(tiny_model_dir, cfg, "naive", packing=False)
    packed = _step(tiny_model_dir, cfg, "torch", packing=True)
    # reference: every example alone, full logits, sum(w * ce) / sum(w)
    model, enc = padded[3], padded[4]
    num = den = 0.0
    with torch.no_grad():
        for e in enc:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
            ce = F.cross_entropy(logits, torch.tensor(e.labels[1:]), reduction="none",
                                 ignore_index=IGNORE_INDEX)  # fmt: skip
            w = torch.tensor(
                example_weights(e.labels, e.source, cfg.train)[1:], dtype=torch.float64
            )
            num += float((ce * w).sum())
            den += float(w.sum())
    assert padded[1] == pytest.approx(num / den, rel=1e-5)
    assert packed[1] == pytest.approx(num / den, rel=1e-5)
    for k in padded[2]:
        torch.testing.assert_close(packed[2][k], padded[2][k], rtol=1e-4, atol=1e-6)
    # the weights really change the step: not the unweighted gradient
    plain = _step(tiny_model_dir, _train(), "torch", packing=True)
    assert abs(plain[1] - packed[1]) > 1e-4


def test_per_example_normalization_is_the_mean_of_example_means(tiny_model_dir):
    cfg = _train("--train.loss_per_example=true")
    labels = [IGNORE_INDEX] * 2 + [5, 6, 7, 8]
    assert example_weights(labels, "self", cfg.train) == [0, 0, 0.25, 0.25, 0.25, 0.25]
    step = _step(tiny_model_dir, cfg, "torch", packing=True)
    model, enc = step[3], step[4]
    means = []
    with torch.no_grad():
        for e in enc:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
            means.append(float(F.cross_entropy(logits, torch.tensor(e.labels[1:]),
                                               ignore_index=IGNORE_INDEX)))  # fmt: skip
    assert step[1] == pytest.approx(sum(means) / len(means), rel=1e-5)
