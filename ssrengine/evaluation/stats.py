"""Seeded bootstrap confidence intervals, paired differences, AUC and balanced subsets.

Every interval is a percentile bootstrap over the evaluated items (questions, probe prompts,
multiple-choice items) with a fixed seed, so the same inputs always give the same interval.
A *paired* comparison resamples the same item indices for both runs, which removes the
between-item variance the two runs share: the right test for "did run B answer these same
questions better than run A". A difference is called significant when its 95% interval
excludes 0. Statistics are vectorized over resamples: ``stat`` receives an index array of
shape [B, n] (one resample per row) and returns B values.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

REPS = 2000  # resamples: the 2.5/97.5 percentiles settle to ~0.1 points at this count
SEED = 0
LEVEL = 0.95

Stat = Callable[[np.ndarray], np.ndarray]


def resample_indices(
    n: int, *, strata: Sequence[int] | None = None, reps: int = REPS, seed: int = SEED
) -> np.ndarray:
    """[reps, n] indices drawn with replacement; with ``strata`` each stratum (e.g. the gold
    class) is resampled within itself, so every resample keeps the class counts of the data."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(reps, n))
    s = np.asarray(strata)
    out = np.empty((reps, n), dtype=np.int64)
    for k in np.unique(s):
        members = np.flatnonzero(s == k)
        out[:, members] = members[rng.integers(0, len(members), size=(reps, len(members)))]
    return out


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaNs, e.g. an empty class, are ignored)."""
    v = values[~np.isnan(values)]
    if not len(v):
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return (float(lo), float(hi))


def estimate(
    stat: Stat, n: int, *, strata: Sequence[int] | None = None, reps: int = REPS, seed: int = SEED
) -> dict[str, float]:
    """{"value", "lo", "hi"}: ``stat`` on all n items and its 95% bootstrap interval."""
    value = float(stat(np.arange(n)[None, :])[0]) if n else float("nan")
    lo, hi = (
        interval(stat(resample_indices(n, strata=strata, reps=reps, seed=seed)))
        if n
        else (float("nan"),) * 2
    )
    return {"value": value, "lo": lo, "hi": hi}


def paired_difference(
    stat_a: Stat,
    stat_b: Stat,
    n: int,
    *,
    strata: Sequence[int] | None = None,
    reps: int = REPS,
    seed: int = SEED,
) -> dict[str, float | bool]:
    """B − A on the same n items, with the 95% interval of the difference from resampling the
    same indices for both; ``significant`` when the interval excludes 0."""
    idx = resample_indices(n, strata=strata, reps=reps, seed=seed)
    full = np.arange(n)[None, :]
    diff = stat_b(idx) - stat_a(idx)
    lo, hi = interval(diff)
    return {
        "value": float(stat_b(full)[0] - stat_a(full)[0]),
        "lo": lo,
        "hi": hi,
        "significant": bool(lo > 0 or hi < 0),
    }


def pooled_paired_difference(
    stats_a: Sequence[Stat],
    stats_b: Sequence[Stat],
    n: int,
    *,
    strata: Sequence[int] | None = None,
    reps: int = REPS,
    seed: int = SEED,
) -> dict[str, float | bool]:
    """Mean over B's seeds − mean over A's seeds, each ``stats_x[s]`` one training seed's
    statistic on the same n items. The 95% interval resamples both sources of noise: the items
    (the same indices for every run: paired) and, independently per arm, the seeds (with
    replacement), so training noise widens it where one seed alone would hide it."""
    idx = resample_indices(n, strata=strata, reps=reps, seed=seed)
    full = np.arange(n)[None, :]
    rng = np.random.default_rng(seed + 1)

    def pooled(stats_x: Sequence[Stat]) -> tuple[float, np.ndarray]:
        per_seed = np.stack([st(idx) for st in stats_x])  # (S, reps)
        draw = rng.integers(0, len(stats_x), size=(len(stats_x), reps))  # (S, reps)
        value = float(np.mean([st(full)[0] for st in stats_x]))
        return value, np.take_along_axis(per_seed, draw, axis=0).mean(axis=0)

    va, ra = pooled(stats_a)
    vb, rb = pooled(stats_b)
    lo, hi = interval(rb - ra)
    return {"value": vb - va, "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0)}


def mean_stat(values: Sequence[float]) -> Stat:
    """Mean of per-item values (accuracy of 0/1 values, mean recall, ...)."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=1)


def ratio_stat(num: Sequence[float], den: Sequence[float]) -> Stat:
    """sum(num) / sum(den) over the resampled items (e.g. log-probability per token)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return lambda idx: a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½
    (the Mann–Whitney U statistic over n_pos·n_neg). NaN when a class is empty."""
    return float(auc_stat(scores, positive)(np.arange(len(scores))[None, :])[0])


def auc_stat(scores: Sequence[float], positive: Sequence[bool]) -> Stat:
    """AUC over resampled items, vectorized: ranks within each resample (average ranks for
    ties) give U = sum of positive ranks − n_pos(n_pos+1)/2."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)

    def stat(idx: np.ndarray) -> np.ndarray:
        x, y = s[idx], p[idx]
        order = np.argsort(x, axis=1, kind="stable")
        xs = np.take_along_axis(x, order, axis=1)
        ranks = np.empty_like(xs)
        n = x.shape[1]
        # tied scores share the average of the 1-based positions they occupy
        for r in range(x.shape[0]):
            _, first, counts = np.unique(xs[r], return_index=True, return_counts=True)
            avg = np.repeat(first + (counts + 1) / 2, counts)
            ranks[r, order[r]] = avg
        n_pos = y.sum(axis=1).astype(np.float64)
        n_neg = n - n_pos
        u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)

    return stat


def seeded_subset(items: Sequence[T], limit: int, seed: int = SEED) -> list[T]:
    """``limit`` items drawn without replacement with a fixed seed, in their original order;
    all of them when ``limit`` is 0 or not smaller than the number of items."""
    if not limit or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def balanced_subset(
    items: Sequence[T], positive: Sequence[bool], limit: int, seed: int = SEED
) -> list[T]:
    """``limit`` items, half from each class (the odd one to the positive class), seeded, in
    their original order; a class with too few items gives all it has and the other fills."""
    if not limit or limit >= len(items):
        return list(items)
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    k_pos = min(len(pos), max(limit - len(neg), (limit + 1) // 2))
    rng = random.Random(seed)
    keep = rng.sample(pos, k_pos) + rng.sample(neg, limit - k_pos)
    return [items[i] for i in sorted(keep)]
