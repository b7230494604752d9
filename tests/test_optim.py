"""The optimizer, the learning-rate schedule and the run length (ssrengine.training.optim):
the schedule checked step by step against its closed form, optimizers by name, epochs as the
default unit, keys given two ways refused, and a finished run extended."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from ssrengine.core.config import TrainConfig
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.training.optim import build_optimizer, total_steps
from ssrengine.training.trainer import train
from tests.test_trainer import rehearsal
from tests.tiny import write_jsonl

LR = 1e-3


def closed_form(s: int, steps: int, warm: int, kind: str, floor: float) -> float:
    """The documented schedule, step s of 1..steps: s / W of the peak up to step W, then the
    decay from the peak at step max(W, 1) to floor × peak at the last step."""
    if s <= warm:
        return LR * s / warm
    if kind == "constant":
        return LR
    peak = max(warm, 1)
    p = (s - peak) / (steps - peak)
    d = 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p
    return LR * (floor + (1 - floor) * d)


def rates(t: TrainConfig, steps: int) -> list[float]:
    """The learning rate each of ``steps`` real optimizer steps ran at."""
    net = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(t, net, torch.device("cpu"), steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return out


@pytest.mark.parametrize(
    ("steps", "warm", "kind"),
    [(4, 2, "cosine"), (4, 0, "cosine"), (10, 3, "linear"), (5, 1, "cosine"), (6, 2, "constant")],
)
def test_schedule_matches_its_closed_form(steps, warm, kind):
    t = TrainConfig(lr=LR, warmup_steps=warm, lr_scheduler=kind, min_lr_ratio=0.1)
    got = rates(t, steps)
    want = [closed_form(s, steps, warm, kind, 0.1) for s in range(1, steps + 1)]
    assert got == pytest.approx(want, rel=1e-12)
    assert max(got) == pytest.approx(LR)
    assert got.index(max(got)) == max(warm, 1) - 1  # the peak at step W (1-based), not W + 1
    if kind != "constant":
        assert got[-1] == pytest.approx(0.1 * LR)  # the floor the docs promise, at the last step


def test_four_step_cosine_run_ends_on_the_floor():
    # The case: a 4-step cosine run with the default warmup used 1.1e-5 at its last
    # step, not the 2e-6 floor.
    assert rates(TrainConfig(), 4) == pytest.approx([1e-5, 2e-5, 1.1e-5, 2e-6])


def test_warmup_ratio_counts_steps_of_the_run():
    t = TrainConfig(lr=LR, warmup_steps=0, warmup_ratio=0.25, lr_scheduler="linear")
    got = rates(t, 10)  # ceil(0.25 × 10) = 3 warmup steps
    assert got == pytest.approx([closed_form(s, 10, 3, "linear", 0.1) for s in range(1, 11)])


def test_any_torch_optimizer_by_name_with_its_kwargs():
    net = torch.nn.Linear(3, 2)
    t = TrainConfig(optimizer="SGD", optimizer_kwargs='{"momentum": 0.9, "nesterov": true}')
    opt, _ = build_optimizer(t, net, torch.device("cpu"), 3)
    assert type(opt) is torch.optim.SGD
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"]
    t = TrainConfig(optimizer_kwargs='{"betas": [0.8, 0.99], "amsgrad": true}')
    opt, _ = build_optimizer(t, net, torch.device("cpu"), 3)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["amsgrad"]


def test_unknown_optimizer_and_refused_kwargs_are_one_line():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(InputError, match=r"'Adamm' is not a torch.optim optimizer; known: .*Adam,"):
        build_optimizer(TrainConfig(optimizer="Adamm"), net, torch.device("cpu"), 3)
    bad = TrainConfig(optimizer="SGD", optimizer_kwargs='{"momentun": 0.9}')
    with pytest.raises(InputError, match=r"train.optimizer_kwargs.*SGD refused.*momentun") as e:
        build_optimizer(bad, net, torch.device("cpu"), 3)
    assert "\n" not in str(e.value)


def test_optimizer_kwargs_from_a_toml_table(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\noptimizer = "RMSprop"\noptimizer_kwargs = {alpha = 0.9}\n')
    cfg = load_config(p)
    assert json.loads(cfg.train.optimizer_kwargs) == {"alpha": 0.9}
    with pytest.raises(InputError, match=r"train.optimizer_kwargs: expected a JSON object"):
        load_config(None, ["--train.optimizer_kwargs=[1, 2]"])


def test_epochs_are_the_default_unit():
    cfg = load_config(None, ["--train.epochs=3"])
    assert cfg.train.max_steps == 0  # unset: train.epochs decides
    assert total_steps(cfg.train, micro_batches_per_epoch=10, world_size=1) == 30
    assert total_steps(load_config(None, []).train, 10, 1) == 10


@pytest.mark.parametrize(
    "args",
    [
        ["--train.max_steps=5", "--train.epochs=3"],
        ["--train.warmup_steps=4", "--train.warmup_ratio=0.1"],
    ],
)
def test_one_thing_given_two_ways_is_one_line(args):
    with pytest.raises(InputError) as e:
        load_config(None, args)
    a, b = (x.split("=")[0][2:] for x in args)
    assert f"{a} = " in str(e.value) and f"{b} = " in str(e.value) and "both given" in str(e.value)
    # Zero says "not this one": the experiment configs give max_steps = 0 beside epochs.
    load_config(None, [args[0].split("=")[0] + "=0", args[1]])


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "rehearsal.jsonl", [r.to_json() for r in rehearsal(8)])
    return run


def _train(model: Path, run: Path, *extra: str) -> Path:
    base = [f"--model.path={model}", f"--run.dir={run}", "--train.lr=1e-3"]
    base += ["--train.loss_impl=naive", "--train.micro_batch_size=2", "--train.warmup_steps=1"]
    return train(load_config(None, [*base, *extra]), run)


def test_a_finished_run_extends_on_the_schedule_of_its_new_length(tiny_model_dir, tmp_path):
    run = _run(tmp_path)
    assert _train(tiny_model_dir, run, "--train.max_steps=2").name == "step-2"
    final = _train(tiny_model_dir, run, "--train.max_steps=5")
    assert final.name == "step-5"
    rows = list(read_rows(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Steps 1-2 ran on the 2-step schedule, 3-5 on the 5-step one (as if planned that long).
    want = [closed_form(s, 2, 1, "cosine", 0.1) for s in (1, 2)]
    want += [closed_form(s, 5, 1, "cosine", 0.1) for s in (3, 4, 5)]
    assert [r["lr"] for r in rows] == pytest.approx(want)
    with pytest.raises(InputError, match=r"already reach step 5, past the 3 steps asked for"):
        _train(tiny_model_dir, run, "--train.max_steps=3")


def test_a_finished_run_extends_by_epochs(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ssrengine")
    run = _run(tmp_path)  # 8 rows, 2 per micro-batch: 4 steps an epoch
    assert _train(tiny_model_dir, run, "--train.epochs=1", "--no-train.packing").name == "step-4"
    assert _train(tiny_model_dir, run, "--train.epochs=2", "--no-train.packing").name == "step-8"
    caplog.clear()
    assert _train(tiny_model_dir, run, "--train.epochs=2", "--no-train.packing").name == "step-8"
    assert "training already finished" in caplog.text


def test_the_command_line_extends_a_finished_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ssrengine.cli import main as cli_main
    from tests.tiny import records

    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", records(6))
    run = tmp_path / "run"
    args = [f"--model.path={tiny_model_dir}", f"--data.train_file={data}", f"--run.dir={run}"]
    args += ["--model.device=cpu", "--generation.max_new_tokens=4", "--run.mode=sft"]
    assert cli_main(["run", *args, "--train.max_steps=2"]) == 0
    assert cli_main(["run", *args, "--train.max_steps=6"]) == 0  # issue 22: was refused
    assert (run / "checkpoints" / "step-6").is_dir()
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # Any other training setting still refuses the checkpoints, naming it.
    capsys.readouterr()
    assert cli_main(["run", *args, "--train.max_steps=8", "--train.lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 2e-05 -> 0.0001" in err and "max_steps" not in err
