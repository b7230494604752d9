"""A refused command changes nothing: every refusal path (changed settings, another model, a
missing or stale stage, a lock held, damaged checkpoints, a symbolic link where a file
belongs) ends in one line and exit 2, and a digest of the whole run directory (every file's
bytes, the lock file included, and every directory) is the same before and after. Run
through the real command line, as tests/test_faults.py does."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_faults import Ctx, _one_error_line, cli, hold_lock
from tests.tiny import records, write_jsonl

T = "train --config {cfg} "


def digest(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's SHA-256, a link's target, 'dir' for a directory;
    {} when ``root`` does not exist."""
    out = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class SharedCtx(Ctx):
    """A case's sandbox whose data file is the module's one: a run directory made in one
    sandbox is valid in another (its config pins the data file's path), so each state below
    is made once and copied."""

    data: Path = Path()

    def format(self, text: str) -> str:
        return super().format(text).replace(str(self.tmp / "data.jsonl"), str(self.data))


def run_ok(ctx: Ctx, args: str) -> None:
    r = cli(ctx, args)
    assert r.returncode == 0, r.stderr


# Run-directory states, each made once per module by its commands.
STATES = {
    "empty": [],
    "built_sft": ["build --config {cfg} --run.mode=sft"],
    "trained_sft": ["build --config {cfg} --run.mode=sft", T + "--run.mode=sft"],
    "generated": ["generate --config {cfg}"],
    "built": ["generate --config {cfg}", "judge --config {cfg}", "build --config {cfg}"],
}


@pytest.fixture(scope="module")
def states(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("states")
    data = write_jsonl(root / "data.jsonl", records(6))
    made: dict[str, Path] = {}

    def state(name: str) -> Path:
        if name not in made:
            ctx = SharedCtx(tmp=root / name, model=tiny_model_dir)
            ctx.data = data
            ctx.tmp.mkdir()
            ctx.write_config()
            for command in STATES[name]:
                run_ok(ctx, command)
            made[name] = ctx.run
        return made[name]

    return data, state


@pytest.fixture()
def make_sandbox(tiny_model_dir, tmp_path, states):
    data, state = states
    made = []

    def make(name: str) -> SharedCtx:
        ctx = SharedCtx(tmp=tmp_path, model=tiny_model_dir)
        ctx.data = data
        if STATES[name]:
            shutil.copytree(state(name), ctx.run, symlinks=True)
        ctx.write_config()
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        for undo in reversed(ctx.cleanups):
            undo()


def other_model(ctx: Ctx) -> None:
    other = ctx.tmp / "other-model"
    shutil.copytree(ctx.model, other)
    ctx.vars["other"] = str(other)


def damaged_only_checkpoint(ctx: Ctx) -> None:
    shard = next((ctx.run / "checkpoints" / "step-1" / "dcp").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # zeroed, same size: only the checksum sees it
    shard.write_bytes(bytes(data))


def lock_is_a_link(ctx: Ctx) -> None:
    victim = ctx.tmp / "victim.txt"
    victim.write_text("precious\n")
    (ctx.run / ".lock").unlink()
    (ctx.run / ".lock").symlink_to(victim)


def generations_is_a_link(ctx: Ctx) -> None:
    victim = ctx.tmp / "victim.jsonl"
    victim.write_text('{"id": "precious"}\n')
    ctx.run.mkdir()
    (ctx.run / "generations.jsonl").symlink_to(victim)


def damaged_generations(ctx: Ctx) -> None:
    with open(ctx.run / "generations.jsonl", "a") as f:
        f.write("[1, 2]\n")  # a row of the wrong shape


# (id, state, setup on a copy of it, command, fragment of the one error line)
REFUSALS: list[tuple[str, str, Callable[[Ctx], None] | None, str, str]] = [
    ("changed settings", "trained_sft", None, T + "--run.mode=sft --train.seed=1",
     "train.seed: 0 -> 1"),
    ("changed judge before training", "built", None, T + "--judge.min_f1=0.9",
     "judge.min_f1: 0.3 -> 0.9); run the build stage first"),
    ("another model", "built_sft", other_model,
     "build --config {cfg} --run.mode=sft --model.path={other}",
     "this run directory was made with a different config (model.path: "),
    ("no rehearsal set", "generated", None, T, "rehearsal.jsonl: missing; run the build stage first"),
    ("no generations", "empty", None, "judge --config {cfg}",
     "generations.jsonl: no row under the current settings for 6 example(s)"),
    ("stale generations", "generated", None, "judge --config {cfg} --generation.max_new_tokens=5",
     "run the generate stage"),
    ("no verdicts", "generated", None, "build --config {cfg}",
     "verdicts.jsonl: no row under the current settings"),
    ("fresh run dir, no stage", "empty", None, T + "--run.mode=sft", "rehearsal.jsonl: missing"),
    ("resume without checkpoint", "built_sft", None, T + "--run.mode=sft --resume",
     "--resume given but there is no checkpoint"),
    ("damaged checkpoints", "trained_sft", damaged_only_checkpoint, T + "--run.mode=sft",
     "dcp/shard-00001-model-00001-of-00001.safetensors: contents differ from the SHA-256"),
    ("lock held", "built_sft", hold_lock, T + "--run.mode=sft", "in use by another run (pid {holder})"),
    ("lock is a symlink", "built_sft", lock_is_a_link, T + "--run.mode=sft",
     "run/.lock: is a symbolic link; files in a run directory are not written through links"),
    ("stage file is a symlink", "empty", generations_is_a_link, "generate --config {cfg}",
     "run/generations.jsonl: is a symbolic link"),
    ("damaged stage file", "generated", damaged_generations, "generate --config {cfg}",
     "generations.jsonl:7: corrupt row in a stage output"),
    ("export without rehearsal", "generated", None, "export {run}", "rehearsal.jsonl: missing"),
    ("eval without checkpoint", "built_sft", None, "eval {run}", "no finished checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_a_refused_command_leaves_the_run_directory_byte_identical(make_sandbox, case):
    _, state, setup, command, fragment = case
    sandbox = make_sandbox(state)
    if setup:
        setup(sandbox)
    before, outside = digest(sandbox.run), digest(sandbox.tmp)
    r = cli(sandbox, command)
    assert r.returncode == 2, r.stderr
    assert sandbox.format(fragment) in _one_error_line(r)
    assert digest(sandbox.run) == before
    assert digest(sandbox.tmp) == outside  # a link's target, the data, the config: untouched


def test_the_issue_sequence_config_json_stays_and_export_works(make_sandbox):
    """`train --judge.min_f1=0.9` after build is refused; config.json keeps the settings the
    rehearsal set was built under, so `export RUN` still accepts it."""
    sandbox = make_sandbox("built")
    saved = (sandbox.run / "config.json").read_bytes()
    assert cli(sandbox, T + "--judge.min_f1=0.9").returncode == 2
    assert (sandbox.run / "config.json").read_bytes() == saved
    r = cli(sandbox, "export {run}")
    assert r.returncode == 0, r.stderr
    assert len((sandbox.run / "export" / "trl" / "rehearsal.jsonl").read_text().splitlines()) == 6


def test_retrain_hint_names_tensorboard_and_a_retrain_shows_one_point_per_step(make_sandbox):
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sandbox = make_sandbox("built_sft")
    tb = "--run.mode=sft --train.max_steps=2 --train.report_to=tensorboard"
    run_ok(sandbox, T + tb)
    r = cli(sandbox, T + tb + " --train.seed=1")
    line = _one_error_line(r)
    for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
        assert f"{sandbox.run}/{name}" in line
    # Deleting only what older versions named: tensorboard/ stays, and the new training's
    # events hide the old ones (purge_step) instead of drawing two points per step.
    shutil.rmtree(sandbox.run / "checkpoints")
    (sandbox.run / "metrics.jsonl").unlink()
    run_ok(sandbox, T + tb + " --train.seed=1")
    acc = EventAccumulator(str(sandbox.run / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    metrics = [json.loads(x) for x in (sandbox.run / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in loss] == [round(m["loss"], 4) for m in metrics]
