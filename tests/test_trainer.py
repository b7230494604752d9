import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.core.config_load import load_config
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import RehearsalRow
from ssrengine.training.batching import encode_rows, padded_batch
from ssrengine.training.loss import accumulate
from ssrengine.training.trainer import setup, train, train_step
from tests.test_checkpoint import pickled_files
from tests.tiny import records, write_jsonl


def rehearsal(n=16):
    return [
        RehearsalRow.from_json({**r, "target": r["response"], "source": "gold"}, "test")
        for r in records(n)
    ]


def _cfg(tiny, run_dir, *extra):
    return load_config(
        None,
        [
            f"--model.path={tiny}",
            f"--run.dir={run_dir}",
            "--train.lr=1e-3",
            "--train.warmup_steps=2",
            *extra,
        ],
    )


@pytest.mark.parametrize("impl", ["naive"])
def test_eight_micro_batches_of_one_equal_one_of_eight(tiny_model_dir, impl):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_rows(rehearsal(8), tok, load_config().data)
    grads = []
    for mbs in (
        [padded_batch(enc, tok.pad_token_id)],
        [padded_batch([e], tok.pad_token_id) for e in enc],
    ):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        total, n = accumulate(model, mbs, impl=impl)
        grads.append(({k: p.grad.clone() for k, p in model.named_parameters()}, total / n))
    (g1, l1), (g8, l8) = grads
    torch.testing.assert_close(l1, l8, rtol=1e-5, atol=1e-6)
    for k in g1:
        torch.testing.assert_close(
            g1[k], g8[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_checkpoint_reloads_in_transformers_and_generates(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.max_steps=3", "--train.loss_impl=naive")
    final = train(cfg, tmp_path, rows=rehearsal())
    assert final.name == "step-3"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    trained = load_file(str(final / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert json.loads((final / "run_config.json").read_text())["train"]["max_steps"] == 3
    assert pickled_files(final) == []
    assert [p.name for p in (final / "dcp").iterdir()] == [
        "shard-00001-model-00001-of-00001.safetensors"
    ]
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("step", "loss", "lr", "supervised_tokens", "tokens_per_s", "grad_norm"):
        assert all(key in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_train_step_is_one_optimizer_step_of_train(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.max_steps=3", "--train.loss_impl=naive")
    train(cfg, tmp_path / "a", rows=rehearsal())
    want = read_rows(tmp_path / "a" / "metrics.jsonl")
    tr = setup(cfg, tmp_path / "b", rows=rehearsal())
    got = [train_step(tr) for _ in range(3)]
    assert (tr.step, tr.consumed) == (3, 3)
    assert [round(s.loss, 6) for s in got] == [r["loss"] for r in want]
    assert [s.lr for s in got] == [r["lr"] for r in want]
    assert [s.supervised_tokens for s in got] == [r["supervised_tokens"] for r in want]
    assert got[-1].loss < got[0].loss


def test_killed_training_resumes_to_identical_weights(tiny_model_dir, tmp_path):
    steps = 12
    args = [
        f"--model.path={tiny_model_dir}",
        "--train.lr=1e-3",
        f"--train.max_steps={steps}",
        "--train.save_every=1",
        "--train.loss_impl=naive",
        "--train.micro_batch_size=2",
        "--train.grad_accum=2",
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        d.mkdir()
        write_jsonl(d / "rehearsal.jsonl", [r.to_json() for r in rehearsal(10)])
    ref = train(load_config(None, [*args, f"--run.dir={ref_dir}"]), ref_dir)

    cmd = [sys.executable, "-m", "ssrengine", "train", *args, f"--run.dir={run_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-3").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "training ended before it could be killed"
        )
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert max(done) < steps, "the kill came too late to test a resume"
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    a = load_file(str(ref / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step-{steps}" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ref_losses = [r["loss"] for r in read_rows(ref_dir / "metrics.jsonl")]
    run_rows = read_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in run_rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in run_rows] == pytest.approx(ref_losses, abs=1e-6)


def test_resume_without_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    from ssrengine.core.errors import InputError

    with pytest.raises(InputError, match="no checkpoint to resume from"):
        train(_cfg(tiny_model_dir, tmp_path), tmp_path, rows=rehearsal(), require_resume=True)


def test_epochs_derive_steps_and_max_steps_overrides_the_default(tiny_model_dir, tmp_path):
    # 16 rows, padded batches of 4: 4 micro-batches an epoch; grad_accum 2 -> 2 steps an epoch.
    base = ("--train.max_steps=0", "--train.loss_impl=naive", "--no-train.packing")
    cfg = _cfg(tiny_model_dir, tmp_path, *base, "--train.epochs=1.5", "--train.grad_accum=2")
    final = train(cfg, tmp_path / "e", rows=rehearsal())
    assert final.name == "step-3"  # ceil(1.5 * 4 / 2)
    assert [r["epoch"] for r in read_rows(tmp_path / "e" / "metrics.jsonl")] == [0, 0, 1]
    assert train(cfg, tmp_path / "e", rows=rehearsal()) == final  # finished: a no-op
    cfg = _cfg(tiny_model_dir, tmp_path, *base[1:], "--train.max_steps=1")
    assert train(cfg, tmp_path / "m", rows=rehearsal()).name == "step-1"  # max_steps, not epochs


def test_fused_adamw_matches_adamw(tiny_model_dir, tmp_path):
    losses = []
    for opt in ("adamw", "adamw_fused"):
        cfg = _cfg(tiny_model_dir, tmp_path, "--train.loss_impl=naive", f"--train.optimizer={opt}")
        tr = setup(cfg, tmp_path / opt, rows=rehearsal())
        losses.append([train_step(tr).loss for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_validation_loss_logged_and_best_kept(tiny_model_dir, tmp_path):
    from ssrengine.training.validation import held_out

    rows = rehearsal()
    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        "--train.max_steps=4",
        "--train.loss_impl=naive",
        "--data.eval_fraction=0.25",
        "--train.eval_every=2",
        "--train.keep_best",
    )
    train(cfg, tmp_path, rows=rows)
    metrics = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics if "eval_loss" in r] == [2, 4]
    held = [r for r in rows if held_out(r.id, 0.25)]
    assert 0 < len(held) < len(rows)
    # The logged loss is the fused loss of the held-out rows under the saved weights.
    best = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    assert best["eval_loss"] == pytest.approx(min(evals.values()), abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "best")
    tok = AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "best")
    enc = encode_rows(held, tok, cfg.data)
    total, n = accumulate(model, [padded_batch(enc, tok.pad_token_id)], impl="naive")
    assert (total / n).item() == pytest.approx(best["eval_loss"], rel=1e-4)


def test_tensorboard_gets_the_metrics_rows(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        "--train.max_steps=3",
        "--train.loss_impl=naive",
        "--data.eval_fraction=0.25",
        "--train.report_to=tensorboard",
    )
    train(cfg, tmp_path, rows=rehearsal())
    metrics = read_rows(tmp_path / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics
    ]


def test_missing_tracker_is_one_line_before_training(tiny_model_dir, tmp_path, monkeypatch):
    from ssrengine.core.errors import InputError

    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: None, as when not installed
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.report_to=wandb")
    with pytest.raises(InputError, match=r"train.report_to.*needs the wandb package"):
        train(cfg, tmp_path, rows=rehearsal())
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_save_shows_no_transformers_bar(capfd, caplog, tiny_model_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "plain")
    assert "Writing model shards" in capfd.readouterr().err  # the bar we keep out
    cfg = _cfg(tiny_model_dir, tmp_path, "--train.max_steps=1", "--train.loss_impl=naive")
    with caplog.at_level("INFO", logger="ssrengine"):
        train(cfg, tmp_path / "run", rows=rehearsal())
    assert "Writing model shards" not in capfd.readouterr().err
    assert "saving checkpoint step-1 ..." in caplog.text
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is back
