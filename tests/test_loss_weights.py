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


# ------------------------------------------------------------------ levers on the decision
LONG = ("--data.max_seq_len=256", "--train.max_tokens=512")


def _class_rows():
    """Answerable examples: own answers (self) except two gold; unanswerable: gold refusals."""
    out = []
    for i, r in enumerate(records(12)):
        if r["answerable"] and i > 4:
            row = {**r, "target": f"The year {1900 + i}.", "source": "self"}
        else:
            row = {**r, "target": r["response"], "source": "gold"}
        out.append(RehearsalRow.from_json(row, "test"))
    return out


def test_gold_weights_by_class_and_the_sft_balance():
    from ssrengine.training.loss_weights import gold_balance_factor

    t = _train("--train.loss_weight_gold=2", "--train.loss_weight_gold_answerable=3",
               "--train.loss_weight_gold_unanswerable=0.5").train  # fmt: skip
    labels = [IGNORE_INDEX] * 2 + [7, 8]
    assert example_weights(labels, "gold", t, answerable=True) == [0, 0, 6.0, 6.0]
    assert example_weights(labels, "gold", t, answerable=False) == [0, 0, 1.0, 1.0]
    assert example_weights(labels, "gold", t, answerable=None) == [0, 0, 2.0, 2.0]
    assert example_weights(labels, "self", t, answerable=True) == [0, 0, 1.0, 1.0]
    assert weighted(_train("--train.loss_weight_gold_unanswerable=0.5").train)
    assert weighted(_train("--train.gold_balance=sft").train)

    rows = _class_rows()
    sources, ans = [r.source for r in rows], [r.answerable for r in rows]
    n_ans = sum(ans)
    n_ans_gold = sum(a and s == "gold" for s, a in zip(sources, ans))
    assert (n_ans, n_ans_gold) == (8, 3)
    on = _train("--train.gold_balance=sft").train
    assert gold_balance_factor(sources, ans, on) == pytest.approx(8 / 3)
    assert gold_balance_factor(sources, ans, _train().train) == 1.0
    assert gold_balance_factor(["self"], [True], on) == 1.0  # no answerable gold: no factor
    assert example_weights(labels, "gold", on, answerable=True, balance=4.0) == [0, 0, 4.0, 4.0]
    assert example_weights(labels, "gold", on, answerable=False, balance=4.0) == [0, 0, 1.0, 1.0]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_balance_reaches_the_micro_batches(tiny_model_dir, packing):
    """The factor is the whole set's, whichever examples share a micro-batch."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = _train("--train.gold_balance=sft", f"--train.packing={str(packing).lower()}", *LONG)
    enc = encode_rows(_class_rows(), tok, cfg.data)
    mbs = micro_batches(enc, cfg.train, epoch=0, pad_id=tok.pad_token_id)
    total = sum(mb.supervised_weight for mb in mbs)
    n_tok = {e.id: sum(lab != IGNORE_INDEX for lab in e.labels) for e in enc}
    expected = sum(
        n_tok[e.id] * (8 / 3 if e.source == "gold" and e.answerable else 1.0) for e in enc
    )
    assert total == pytest.approx(expected)


def test_unlikely_target_skips_the_shared_opening(tiny_model_dir):
    from ssrengine.data.records import encode, prompt_messages
    from ssrengine.training.batching import unlikely_target

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = records(2)[1]
    msgs = prompt_messages(r["messages"], r["documents"], _train().data.system_prompt)
    refusal = "The documents do not say."
    ids, labels = encode(tok, msgs, "The company was founded in 1901.")
    pos, token = unlikely_target(tok, msgs, labels, refusal)
    _, ref_labels = encode(tok, msgs, refusal)
    target = [t for t in labels if t != IGNORE_INDEX]
    ref = [t for t in ref_labels if t != IGNORE_INDEX]
    j = pos - (len(labels) - len(target)) + 1
    assert j >= 1 and target[:j] == ref[:j]  # "The" is shared and not penalized
    assert token == ref[j] != target[j]
    assert ids[pos + 1] == target[j]  # the logits at pos predict the own answer's token there
    # an answer that opens differently is penalized at its first token
    _, other = encode(tok, msgs, "Founded in 1901.")
    first = unlikely_target(tok, msgs, other, refusal)
    assert first == (len(other) - sum(t != IGNORE_INDEX for t in other) - 1, ref[0])
    # an answer that is the refusal has no unlikelihood target
    assert unlikely_target(tok, msgs, ref_labels, refusal) is None


def _ul_setup(tiny_model_dir, packing, weight="0.5"):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = _train(
        f"--train.unlikelihood_weight={weight}", f"--train.packing={str(packing).lower()}", *LONG
    )
    enc = encode_rows(_class_rows(), tok, cfg.data, train=cfg.train)
    mbs = micro_batches(enc, cfg.train, epoch=0, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return tok, cfg, enc, mbs, model


@pytest.mark.parametrize("packing", [False, True])
def test_unlikelihood_term_is_the_formula_in_any_batching(tiny_model_dir, packing):
    from ssrengine.models.loading import hidden_and_head
    from ssrengine.training.loss import loss_sum, unlikelihood_sum

    _, _, enc, mbs, model = _ul_setup(tiny_model_dir, packing)
    targets = {e.id: e.unlikely for e in enc if e.unlikely}
    assert set(targets) == {e.id for e in enc if e.source == "self"}  # answerable own answers
    assert sum(len(mb.unlikely_positions) for mb in mbs if mb.unlikely_positions is not None) == (
        len(targets)
    )
    with torch.no_grad():
        got = sum(float(loss_sum(model, mb, "torch", unlikelihood=0.5)) for mb in mbs)
        plain = sum(float(loss_sum(model, mb, "torch")) for mb in mbs)
        term = 0.0
        for mb in mbs:
            if mb.unlikely_positions is not None:
                h, w = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
                h = h.reshape(-1, h.shape[-1])
                term += float(unlikelihood_sum(h, w, mb.unlikely_positions, mb.unlikely_tokens))
        # reference: each example alone, full logits
        ul = 0.0
        for e in enc:
            if e.unlikely:
                pos, token = e.unlikely
                logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
                p = logits[pos].softmax(-1)[token]
                ul += float(-torch.log1p(-p))
    assert ul > 0
    assert term == pytest.approx(ul, rel=1e-4)
    assert got - plain == pytest.approx(0.5 * ul, abs=1e-4)  # fp32 sums of the whole loss


def test_unlikelihood_lowers_the_refusal_after_answerable_prompts(tiny_model_dir):
    from ssrengine.models.loading import hidden_and_head
    from ssrengine.training.loss import unlikelihood_sum

    _, _, _, mbs, model = _ul_setup(tiny_model_dir, packing=True)
    mb = next(mb for mb in mbs if mb.unlikely_positions is not None)

    def refusal_prob() -> float:
        with torch.no_grad():
            h, w = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
            logits = h.reshape(-1, h.shape[-1])[mb.unlikely_positions] @ w.T
            return float(logits.softmax(-1).gather(1, mb.unlikely_tokens[:, None]).mean())

    before = refusal_prob()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        h, w = hidden_and_head(model, mb.input_ids, **mb.model_kwargs)
        ul = unlikelihood_sum(
            h.reshape(-1, h.shape[-1]), w, mb.unlikely_positions, mb.unlikely_tokens
        )
        opt.zero_grad()
        ul.backward()
        opt.step()
    assert refusal_prob() < before


def test_unlikelihood_off_adds_nothing(tiny_model_dir):
    _, _, enc, mbs, _ = _ul_setup(tiny_model_dir, packing=True, weight="0")
    assert all(e.unlikely is None for e in enc)
    assert all(mb.unlikely_positions is None for mb in mbs)
