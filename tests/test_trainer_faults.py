"""Training faults end cleanly and resume exactly: interrupts at the worst moments, damaged
checkpoints, non-finite steps. Every resumed run is compared bitwise (weights, AdamW moments,
losses) to an uninterrupted one on the tiny model.

Interrupts go through the real command line in a subprocess with a wrapper (`DRIVER`) that
sends SIGINT to itself at one exact point: right after an optimizer step, or inside the DCP
write of a checkpoint (once, or twice in a row)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.training.checkpoint import checkpoint_damage
from ssrengine.training.trainer import train
from tests.test_trainer import rehearsal
from tests.tiny import records, write_jsonl

STEPS = 6
ARGS = [
    "--train.lr=1e-3",
    f"--train.max_steps={STEPS}",
    "--train.save_every=2",
    "--train.keep_checkpoints=2",
    "--train.loss_impl=naive",
    "--train.micro_batch_size=2",
    "--train.warmup_steps=2",
]

# argv: WHERE (none | after_step | in_write), AT (the n-th such point, 1-based), TIMES (signals
# sent there: $SIGNAL, default SIGINT), then the ssrengine command line. Under torchrun only
# rank $SIGNAL_RANK signals.
DRIVER = """\
import os, signal, sys

from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.optim.optimizer import register_optimizer_step_post_hook

where, at, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = [0]


def point():
    seen[0] += 1
    # Under torchrun only rank SIGNAL_RANK is signalled.
    if seen[0] == at and os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0"):
        for _ in range(times):
            os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL", "SIGINT")))


if where == "after_step":
    register_optimizer_step_post_hook(lambda opt, args, kwargs: point())
elif where == "in_write":
    write_data = HuggingFaceStorageWriter.write_data

    def wrapped(self, plan, planner):
        point()
        return write_data(self, plan, planner)

    HuggingFaceStorageWriter.write_data = wrapped
    # One process writes its shard itself (ssrengine.training.checkpoint._stream_dcp_shard), not via DCP.
    import ssrengine.training.checkpoint as ck

    stream = ck._stream_dcp_shard

    def streamed(tensors, path):
        point()
        return stream(tensors, path)

    ck._stream_dcp_shard = streamed

from ssrengine.cli import main

sys.exit(main(sys.argv[4:]))
"""


def _run_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    write_jsonl(d / "rehearsal.jsonl", [r.to_json() for r in rehearsal(10)])
    return d


def _cli(
    model: Path,
    run_dir: Path,
    where: str = "none",
    at: int = 0,
    times: int = 0,
    *extra: str,
    sig: str = "SIGINT",
) -> subprocess.CompletedProcess:
    driver = run_dir.parent / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), where, str(at), str(times), "train"]
    cmd += [f"--model.path={model}", f"--run.dir={run_dir}", *ARGS, *extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "SIGNAL": sig}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def assert_same_run(ref: Path, run: Path, steps: int = STEPS) -> None:
    """Final weights, AdamW state and every loss bitwise equal."""
    a, b = ref / "checkpoints" / f"step-{steps}", run / "checkpoints" / f"step-{steps}"
    for f in ("model.safetensors", "dcp/shard-00001-model-00001-of-00001.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{f}: {k} differs"
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in read_rows(ref / "metrics.jsonl")]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in read_rows(run / "metrics.jsonl")]
    assert got == want


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run, through the same driver."""
    ref = _run_dir(tmp_path_factory.mktemp("ref"), "ref")
    res = _cli(tiny_model_dir, ref)
    assert res.returncode == 0, res.stderr[-3000:]
    return ref


# (where, at, times, checkpoints right after the interrupt)
INTERRUPTS = [
    # Right after the 3rd optimizer step: step 3 completes, is saved, and the run stops.
    ("after_step", 3, 1, ["step-2", "step-3"]),
    # Inside the write of step-2: that checkpoint completes, then the run stops.
    ("in_write", 1, 1, ["step-2"]),
    # Twice inside the write of step-4: stop at once, the last complete checkpoint stays.
    ("in_write", 2, 2, ["step-2"]),
]


@pytest.mark.parametrize("where,at,times,kept", INTERRUPTS)
def test_sigint_stops_at_a_consistent_state_and_resumes_exactly(
    tiny_model_dir, tmp_path, reference, where, at, times, kept
):
    run = _run_dir(tmp_path, "run")
    res = _cli(tiny_model_dir, run, where, at, times)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == kept
    assert all(checkpoint_damage(ckpts / k) is None for k in kept)
    state = json.loads((ckpts / kept[-1] / "trainer_state.json").read_text())
    assert state["micro_batches"] == state["step"]  # data position and step agree

    res = _cli(tiny_model_dir, run, "none", 0, 0, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run)
    assert list(ckpts.glob(".*.tmp")) == []


def test_sigterm_stops_like_sigint_and_exits_143(tiny_model_dir, tmp_path, reference):
    """SIGTERM (what schedulers and torchrun send) takes the same path as SIGINT: step 3
    completes and is saved, the command exits 128 + 15 as a shell reports it, the rerun
    resumes exactly."""
    run = _run_dir(tmp_path, "run")
    res = _cli(tiny_model_dir, run, "after_step", 3, 1, sig="SIGTERM")
    assert res.returncode == 143, res.stderr[-3000:]
    assert "SIGTERM: stopping after this step" in res.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    res = _cli(tiny_model_dir, run, "none", 0, 0, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(reference, run)


def _torchrun(driver: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "SIGNAL_RANK": "1"}
    return subprocess.run(
        [*cmd, str(driver), *argv], env=env, capture_output=True, text=True, timeout=600
    )


def test_sigint_on_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, tmp_path):
    """FSDP2 on 2 ranks: rank 1 alone gets SIGINT right after its 3rd optimizer step; the flag
    travels in step 4's all-reduce, both ranks save step-4 together and stop; the resumed run
    equals the uninterrupted one."""
    data, driver = tmp_path / "train.jsonl", tmp_path / "driver.py"
    write_jsonl(data, records(16))
    driver.write_text(DRIVER)

    def args(run: Path) -> list[str]:
        return [
            "run",
            f"--model.path={tiny_model_dir}",
            f"--data.train_file={data}",
            "--run.mode=sft",
            f"--run.dir={run}",
            *ARGS,
            "--train.save_every=5",
            "--train.parallel=fsdp",
        ]

    ref, run = tmp_path / "ref", tmp_path / "run"
    res = _torchrun(driver, "none", "0", "0", *args(ref))
    assert res.returncode == 0, res.stderr[-5000:]
    res = _torchrun(driver, "after_step", "3", "1", *args(run))
    assert res.returncode != 0, res.stderr[-5000:]
    assert "interrupted: saving step 4" in res.stderr, res.stderr[-5000:]
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob("step-*")] == ["step-4"]
    assert checkpoint_damage(ckpts / "step-4") is None
    res = _torchrun(driver, "none", "0", "0", *args(run), "--resume")
    assert res.returncode == 0, res.stderr[-5000:]
    assert_same_run(ref, run)


# ----------------------------------------------------------------------------- damaged checkpoints
def _shard(ckpt: Path) -> Path:
    return next((ckpt / "dcp").glob("*.safetensors"))


def _zero(f: Path) -> None:
    """Zero 4 KiB in the second half of ``f`` (tensor data, past the header), keeping its size."""
    data = bytearray(f.read_bytes())
    at = len(data) // 2
    data[at : at + 4096] = bytes(len(data[at : at + 4096]))
    f.write_bytes(bytes(data))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


DAMAGE = {
    "rng missing": (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors: missing"),
    "shard missing": (lambda c: _shard(c).unlink(), "-model-00001-of-00001.safetensors: missing"),
    "shard truncated": (lambda c: _truncate(_shard(c)), "(truncated or overwritten)"),
    "state not JSON": (
        lambda c: (c / "trainer_state.json").write_text('{"step": 4, "sched'),
        "trainer_state.json: unreadable",
    ),
    "state lacks keys": (
        lambda c: (c / "trainer_state.json").write_text('{"step": 4}'),
        "trainer_state.json: lacks scheduler, optimizer",
    ),
    # Same size, valid header: only the SHA-256 recorded at save tells.
    "shard zeroed": (lambda c: _zero(_shard(c)), "contents differ from the SHA-256 recorded"),
    "export zeroed": (
        lambda c: _zero(c / "model.safetensors"),
        "model.safetensors: contents differ from the SHA-256 recorded",
    ),
}


def _train(model: Path, run: Path, *extra: str) -> Path:
    cfg = load_config(None, [f"--model.path={model}", f"--run.dir={run}", *ARGS, *extra])
    return train(cfg, run)


@pytest.fixture(scope="module")
def reference_in_process(tiny_model_dir, tmp_path_factory) -> Path:
    ref = _run_dir(tmp_path_factory.mktemp("ref-in-process"), "ref")
    _train(tiny_model_dir, ref, "--train.save_every=1")
    return ref


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_named_and_the_previous_one_resumed(
    tiny_model_dir, tmp_path, reference_in_process, caplog, kind
):
    caplog.set_level(logging.INFO, logger="ssrengine")
    damage, fragment = DAMAGE[kind]
    run = _run_dir(tmp_path, "run")
    _train(tiny_model_dir, run, "--train.save_every=1")
    ckpts, last = run / "checkpoints", f"step-{STEPS}"
    assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-{STEPS - 1}", last]
    damage(ckpts / last)
    assert fragment in checkpoint_damage(ckpts / last)
    # The finished run is not finished any more: its last step is redone from step-5.
    assert _train(tiny_model_dir, run, "--train.save_every=1").name == last
    assert fragment in caplog.text and last in caplog.text
    assert "resuming from" in caplog.text and f"step-{STEPS - 1}" in caplog.text
    assert checkpoint_damage(ckpts / last) is None
    assert_same_run(reference_in_process, run)


@pytest.mark.parametrize("kind", DAMAGE)
def test_no_undamaged_checkpoint_stops_with_one_line(tiny_model_dir, tmp_path, kind):
    damage, fragment = DAMAGE[kind]
    run = _run_dir(tmp_path, "run")
    _train(tiny_model_dir, run, "--train.max_steps=2", "--train.keep_checkpoints=1")
    damage(run / "checkpoints" / "step-2")
    with pytest.raises(InputError, match="no checkpoint can be resumed from") as e:
        _train(tiny_model_dir, run)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert (run / "checkpoints" / "step-2").is_dir()  # left for inspection


def test_no_undamaged_checkpoint_exits_2_through_the_cli(tiny_model_dir, tmp_path):
    run = _run_dir(tmp_path, "run")
    # The same settings both times: a changed one is refused for another reason.
    args = ("--train.max_steps=3", "--train.save_every=0", "--train.keep_checkpoints=1")
    res = _cli(tiny_model_dir, run, "none", 0, 0, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    (run / "checkpoints" / "step-3" / "rng.safetensors").unlink()
    res = _cli(tiny_model_dir, run, "none", 0, 0, *args, "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rng.safetensors: missing" in errors[0]
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------ non-finite steps
@pytest.fixture
def poison(monkeypatch):
    """poison({n, ...}): from now on, the loss of the n-th micro-batch computed (1-based)
    becomes NaN."""
    import ssrengine.training.loss as loss_mod

    calls, bad = [0], set()
    real = loss_mod.loss_sum

    def loss_sum(*a, **kw):
        calls[0] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls[0] in bad else out

    def arm(ns: set[int]) -> None:
        calls[0] = 0
        bad.clear()
        bad.update(ns)

    monkeypatch.setattr(loss_mod, "loss_sum", loss_sum)
    return arm


def test_nonfinite_loss_stops_naming_the_step_and_the_last_checkpoint_resumes(
    tiny_model_dir, tmp_path, reference_in_process, poison, monkeypatch
):
    run = _run_dir(tmp_path, "run")
    poison({3})
    with pytest.raises(InputError, match=r"step 3: loss nan .* not both finite") as e:
        _train(tiny_model_dir, run, "--train.save_every=1")
    assert "step-2" in str(e.value)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-1", "step-2"]
    assert list(ckpts.glob(".*.tmp")) == []
    monkeypatch.undo()
    _train(tiny_model_dir, run, "--train.save_every=1")
    assert_same_run(reference_in_process, run)


def test_skip_nonfinite_steps_leaves_weights_and_optimizer_state_alone(
    tiny_model_dir, tmp_path, poison
):
    run = _run_dir(tmp_path, "run")
    poison({3, 5})
    final = _train(tiny_model_dir, run, "--train.skip_nonfinite_steps=2")
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 2
    assert state["micro_batches"] == STEPS + 2  # the skipped batches are consumed
    assert state["scheduler"]["last_epoch"] == STEPS
    adam = load_file(str(_shard(final)))
    counts = {float(v) for k, v in adam.items() if k.startswith("optim.") and k.endswith(".step")}
    assert counts == {float(STEPS)}  # AdamW stepped exactly max_steps times
    assert all(torch.isfinite(v).all() for v in adam.values())


def test_skip_budget_counts_across_a_resume(tiny_model_dir, tmp_path, poison):
    run = _run_dir(tmp_path, "run")
    poison({2})
    _train(tiny_model_dir, run, "--train.skip_nonfinite_steps=1", "--train.max_steps=3")
    poison({1})  # the next run's first micro-batch: one more than the budget
    with pytest.raises(InputError, match=r"step 4: .*1 of train.skip_nonfinite_steps=1 skipped"):
        _train(tiny_model_dir, run, "--train.skip_nonfinite_steps=1")


def test_nonfinite_weights_are_never_saved(tiny_model_dir, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(opt, args, kwargs):
        if opt.state[opt.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("inf"))

    run = _run_dir(tmp_path, "run")
    handle = register_optimizer_step_post_hook(hook)
    try:
        with pytest.raises(InputError, match="step 2: the weights are not finite; not saved"):
            _train(tiny_model_dir, run, "--train.save_every=1")
    finally:
        handle.remove()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-1"]
    final = _train(tiny_model_dir, run, "--train.save_every=1", "--train.max_steps=2")
    assert all(torch.isfinite(v).all() for v in load_file(str(_shard(final))).values())
