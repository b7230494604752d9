import itertools
import random

import numpy as np
import pytest

from ssrengine.core.eval_rows import EvalDetail
from ssrengine.evaluation import stats
from ssrengine.evaluation.metrics import DECISION_AUC, PAPER_METRICS, paper_metrics, task_metrics


def _pairwise_auc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_equals_pairwise_count_with_ties():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.0, 0.5, 1.0, 1.5, rng.random()]) for _ in range(n)]
        positive = [rng.random() < 0.4 for _ in range(n)]
        if all(positive) or not any(positive):
            positive[0] = not positive[0]
        assert stats.auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive))
    assert stats.auc([1, 2, 3], [True, True, True]) != stats.auc([1, 2, 3], [True, True, True])


def test_auc_stat_per_resample_matches_pairwise():
    scores, positive = [0.1, 0.4, 0.4, 0.9, 0.3, 0.7], [0, 1, 0, 1, 0, 1]
    idx = stats.resample_indices(6, strata=positive, reps=50, seed=1)
    got = stats.auc_stat(scores, positive)(idx)
    for row, v in zip(idx, got):
        want = _pairwise_auc([scores[i] for i in row], [positive[i] for i in row])
        assert v == pytest.approx(want)


def test_stratified_resamples_keep_class_counts_and_are_seeded():
    strata = [0, 0, 0, 1, 1, 0, 1]
    a = stats.resample_indices(7, strata=strata, reps=100, seed=5)
    assert (a == stats.resample_indices(7, strata=strata, reps=100, seed=5)).all()
    assert not (a == stats.resample_indices(7, strata=strata, reps=100, seed=6)).all()
    s = np.asarray(strata)
    assert (s[a] == s[None, :]).all()  # position k always draws from its own class


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.6).astype(float)
    est = stats.estimate(stats.mean_stat(x), len(x), reps=4000)
    se = x.std() / np.sqrt(len(x))
    assert est["value"] == pytest.approx(x.mean())
    assert est["lo"] == pytest.approx(x.mean() - 1.96 * se, abs=0.01)
    assert est["hi"] == pytest.approx(x.mean() + 1.96 * se, abs=0.01)


def test_paired_difference_is_tighter_than_unpaired_and_flags_significance():
    rng = np.random.default_rng(1)
    hard = rng.random(200) < 0.5  # shared difficulty: both runs miss the hard items
    a = (~hard & (rng.random(200) < 0.9)).astype(float)
    b = np.maximum(a, (rng.random(200) < 0.08).astype(float))  # b = a plus a few extra wins
    d = stats.paired_difference(stats.mean_stat(a), stats.mean_stat(b), 200)
    assert d["value"] == pytest.approx(b.mean() - a.mean())
    assert d["significant"] and d["lo"] > 0
    ea, eb = (stats.estimate(stats.mean_stat(v), 200) for v in (a, b))
    # unpaired intervals overlap although the paired difference is clearly positive
    assert ea["hi"] > eb["lo"]
    same = stats.paired_difference(stats.mean_stat(a), stats.mean_stat(a), 200)
    assert not same["significant"] and same["value"] == 0.0


def test_balanced_and_seeded_subsets():
    items = list(range(20))
    pos = [i % 4 == 0 for i in items]  # 5 positives
    sub = stats.balanced_subset(items, pos, 8, seed=0)
    assert len(sub) == 8 and sub == sorted(sub)
    assert sum(pos[i] for i in sub) == 4
    assert sub == stats.balanced_subset(items, pos, 8, seed=0)
    assert sub != stats.balanced_subset(items, pos, 8, seed=1)
    # too few positives: all of them, the other class fills
    sub = stats.balanced_subset(items, pos, 14, seed=0)
    assert sum(pos[i] for i in sub) == 5 and len(sub) == 14
    assert stats.balanced_subset(items, pos, 0) == items == stats.balanced_subset(items, pos, 99)
    assert stats.seeded_subset(items, 5, 2) == sorted(stats.seeded_subset(items, 5, 2))
    assert len(set(stats.seeded_subset(items, 5, 2))) == 5


def _d(i, unans, declined, recall=None, lp=None):
    return EvalDetail(f"e{i}", unans, declined, recall, recall, lp)


def test_paper_metrics_hand_computed():
    # answerable: 4, one declined; unanswerable: 3, two declined
    details = [
        _d(0, False, False, 1.0, -9.0),
        _d(1, False, False, 0.5, -8.0),
        _d(2, False, True, 0.0, -2.0),
        _d(3, False, False, 0.25, -7.0),
        _d(4, True, True, lp=-1.0),
        _d(5, True, True, lp=-3.0),
        _d(6, True, False, lp=-8.5),
    ]
    p = paper_metrics(details)
    assert set(p) == {*PAPER_METRICS, DECISION_AUC}
    v = {k: x["value"] for k, x in p.items()}
    assert v["answerable_acc"] == pytest.approx(3 / 4)
    assert v["unanswerable_acc"] == pytest.approx(2 / 3)
    assert v["accuracy"] == pytest.approx(5 / 7)
    # answerable class: TP 3, FP 1 (unanswerable answered), FN 1 -> 6/8
    assert v["answerable_f1"] == pytest.approx(6 / 8)
    # unanswerable class: TP 2, FP 1, FN 1 -> 4/6
    assert v["unanswerable_f1"] == pytest.approx(4 / 6)
    assert v["answer_recall"] == pytest.approx(1.75 / 4)
    assert v["decline_answerable"] == pytest.approx(1 / 4)
    assert v["decline_unanswerable"] == pytest.approx(2 / 3)
    assert v["score"] == pytest.approx(100 * (4 / 6 + 1.75 / 4) / 2)
    # the refusal's log-likelihood ranked between the classes: unanswerable = positive
    scores = [d.refusal_logprob for d in details]
    assert v[DECISION_AUC] == pytest.approx(
        _pairwise_auc(scores, [d.unanswerable for d in details])
    )
    for x in p.values():
        assert x["lo"] <= x["value"] <= x["hi"] or np.isnan(x["lo"])


def test_paper_metrics_agree_with_the_confusion_matrix_metrics():
    from ssrengine.data.records import Example

    exs = [
        Example(id=f"e{i}", messages=[{"role": "user", "content": "q?"}],
                response="Founded in 1900." if i % 3 else "The documents do not say.",
                answerable=bool(i % 3))
        for i in range(12)
    ]  # fmt: skip
    answers = {e.id: ("The documents do not say." if i % 4 == 0 else "Founded in 1900.")
               for i, e in enumerate(exs)}  # fmt: skip
    m, _ = task_metrics(exs, answers)
    assert m.paper is not None and DECISION_AUC not in m.paper
    assert m.paper["unanswerable_f1"]["value"] == pytest.approx(m.unanswerable.f1)
    assert m.paper["answer_recall"]["value"] == pytest.approx(m.answer_recall)
    assert m.paper["accuracy"]["value"] == pytest.approx(m.unanswerable.accuracy)
    assert m.paper["score"]["value"] == pytest.approx(m.score)


def test_pooled_paired_difference_over_seeds():
    rng = np.random.default_rng(1)
    n = 120
    a = [rng.random(n) < 0.5 for _ in range(3)]
    b = [rng.random(n) < 0.7 for _ in range(3)]
    sa, sb = [stats.mean_stat(x) for x in a], [stats.mean_stat(x) for x in b]
    d = stats.pooled_paired_difference(sa, sb, n)
    expected = np.mean([x.mean() for x in b]) - np.mean([x.mean() for x in a])
    assert d["value"] == pytest.approx(expected)
    assert d["lo"] < d["value"] < d["hi"] and d["significant"]
    # one seed per arm: the same point value as the paired difference
    one = stats.pooled_paired_difference(sa[:1], sb[:1], n)
    assert one["value"] == pytest.approx(stats.paired_difference(sa[0], sb[0], n)["value"])
    # the same run under every seed adds no training noise: no wider than one seed
    same = stats.pooled_paired_difference(sa[:1] * 3, sb[:1] * 3, n)
    assert same["hi"] - same["lo"] == pytest.approx(one["hi"] - one["lo"], rel=0.15)


def test_pooled_interval_grows_with_seed_noise():
    """Seeds that disagree widen the interval beyond what resampling questions gives."""
    n = 200
    base = np.zeros(n)
    base[: n // 2] = 1.0
    a = [stats.mean_stat(base)] * 3
    noisy = []
    for shift in (0, 30, 60):  # seeds answer 50%, 65%, 80% correctly
        v = np.zeros(n)
        v[: n // 2 + shift] = 1.0
        noisy.append(stats.mean_stat(v))
    calm = [noisy[1]] * 3
    wide = stats.pooled_paired_difference(a, noisy, n)
    narrow = stats.pooled_paired_difference(a, calm, n)
    assert wide["value"] == pytest.approx(narrow["value"]) == pytest.approx(0.15)
    assert wide["hi"] - wide["lo"] > 1.5 * (narrow["hi"] - narrow["lo"])
