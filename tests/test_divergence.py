"""Training that diverges stops before it is checkpointed, with one line: the loss reached
ln(vocabulary size) (a model guessing uniformly) or jumped far above its running median
(train.divergence_factor). Float settings are bounded: lr = 1e39 is one line, not a traceback."""

from __future__ import annotations

import math

import pytest

from ssrengine.training.divergence import MEDIAN_FLOOR, WINDOW, DivergenceGuard
from tests.test_faults import Ctx, _one_error_line, cli
from tests.tiny import records, write_jsonl

V = 49152
UNIFORM = math.log(V)


def _feed(guard: DivergenceGuard, losses: list[float]) -> list[str | None]:
    return [guard.check(x) for x in losses]


def test_a_loss_at_ln_vocab_after_learning_stops():
    guard = DivergenceGuard(V, factor=10)
    assert _feed(guard, [2.1, 1.8, 1.6]) == [None] * 3
    why = guard.check(UNIFORM - 0.01)  # a softmax near uniform scores a hair under ln(V)
    assert why is not None and f"reached ln(vocabulary size) = {UNIFORM:.4f}" in why
    assert "median of 1.8000 over the last 3 steps" in why


def test_a_jump_far_above_the_running_median_stops():
    guard = DivergenceGuard(V, factor=4)
    assert _feed(guard, [2.0] * 5 + [7.9]) == [None] * 6  # under 4 x the median 2.0
    why = guard.check(8.1)
    assert why == (
        "loss 8.1000 is more than train.divergence_factor=4 times the median 2.0000 of the "
        "last 6 steps"
    )


def test_the_median_floor_keeps_late_gold_batches_from_stopping_a_run():
    guard = DivergenceGuard(V, factor=10)
    assert _feed(guard, [0.02] * 20) == [None] * 20
    # 1.5 nats is 75 x the median, but under 10 x the floor (0.05 x ln V = 0.54 nats)
    assert guard.check(1.5) is None
    assert guard.check(10 * MEDIAN_FLOOR * UNIFORM + 0.01) is not None


def test_a_random_model_starting_at_ln_vocab_is_not_stopped():
    guard = DivergenceGuard(V, factor=10)
    assert _feed(guard, [UNIFORM + 0.02, UNIFORM - 0.01, UNIFORM + 0.03, UNIFORM]) == [None] * 4


def test_the_window_and_factor_zero():
    guard = DivergenceGuard(V, factor=0)
    assert _feed(guard, [1.0, 100.0, UNIFORM]) == [None] * 3
    guard = DivergenceGuard(V, factor=3)
    _feed(guard, [5.0] * WINDOW + [1.0] * WINDOW)  # the old losses left the window
    assert guard.check(3.5) is not None  # 3.5 > 3 x max(1.0, floor 0.54)


@pytest.fixture()
def sandbox(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", records(6))
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir)
    ctx.write_config()
    r = cli(ctx, "build --config {cfg} --run.mode=sft")
    assert r.returncode == 0, r.stderr
    return ctx


def test_divergence_stops_training_before_a_checkpoint_with_one_line(sandbox):
    # The tiny random model starts at ln(V); lr = 1 throws it far above that in one step.
    args = "--run.mode=sft --train.max_steps=4 --train.lr=1 --train.divergence_factor=1.5"
    r = cli(sandbox, "train --config {cfg} " + args)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r)
    assert "step 2: training diverged: loss " in line
    assert "more than train.divergence_factor=1.5 times the median" in line
    assert "nothing saved" in line and "lower train.lr" in line
    assert not any((sandbox.run / "checkpoints").glob("step-*"))
    # the same run with the guard off trains on and saves (the guard decided, nothing else)
    r = cli(sandbox, "train --config {cfg} " + args.replace("1.5", "0"))
    assert r.returncode == 0, r.stderr
    assert (sandbox.run / "checkpoints" / "step-4").is_dir()


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--train.lr=1e39", "train.lr: must be > 0 and <= 1e+06, got 1e+39"),
        ("--train.adam_eps=1e39", "train.adam_eps: must be > 0 and <= 1, got 1e+39"),
        ("--train.max_grad_norm=1e39", "train.max_grad_norm: must be >= 0 and <= 1e+06"),
        ("--generation.timeout_s=1e39", "generation.timeout_s: must be > 0 and <= 86400"),
        ("--train.divergence_factor=-1", "train.divergence_factor: must be >= 0"),
    ],
)
def test_float_settings_are_bounded(sandbox, arg, fragment):
    r = cli(sandbox, "train --config {cfg} --run.mode=sft " + arg)
    assert r.returncode == 2
    assert fragment in _one_error_line(r)
