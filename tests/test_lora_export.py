"""LoRA checkpoints hold the adapter and the resume state; the run's final checkpoint also the
merged model (issue 22). `hf_dir` merges an adapter-only checkpoint on demand (eval of an
interrupted run), `export --format hf` writes a standalone HF directory of any checkpoint,
LoRA (merged) or full fine-tuning (copied)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssrengine.cli import main as cli_main
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.rundir import RunDir
from ssrengine.evaluation.evaluate import resolve_target
from ssrengine.models.fetch import resolve_model_path
from ssrengine.models.lora import SOURCE, hf_dir, is_adapter_only, merged_dir
from ssrengine.training.checkpoint import (
    TRAINER_STATE,
    checkpoint_damage,
    read_trainer_state,
    resumable_checkpoint,
)
from ssrengine.training.trainer import train
from tests.tiny import records, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # peft
STEPS = 3
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


def _train(tiny, run_dir, *extra):
    write_jsonl(
        run_dir / "rehearsal.jsonl",
        [{**r, "target": r["response"], "source": "gold"} for r in records(8)],
    )
    args = [
        f"--model.path={tiny}",
        f"--run.dir={run_dir}",
        "--train.lr=1e-2",
        f"--train.max_steps={STEPS}",
        "--train.save_every=1",
        "--train.keep_checkpoints=0",
        "--train.micro_batch_size=4",
        *extra,
    ]
    cfg = load_config(None, args)
    cfg.save(RunDir(run_dir).config)  # what the pipeline writes: eval and export read it
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    # Validation every step: train.keep_best makes checkpoints/best of one of them.
    return _train(
        tiny_model_dir,
        tmp_path_factory.mktemp("lora"),
        "--train.lora=true",
        "--data.eval_fraction=0.3",
        "--train.keep_best=true",
        "--train.eval_every=1",
    )


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("full"))


def _ckpt(run, step):
    return RunDir(run).checkpoints / f"step-{step}"


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _logits(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


def _peft_logits(base, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_only_the_final_lora_checkpoint_holds_the_merged_model(lora_run):
    for step in (1, 2):
        c = _ckpt(lora_run, step)
        assert not (c / "model.safetensors").exists() and not (c / "config.json").exists()
        assert (c / "adapter" / "adapter_model.safetensors").is_file()
        assert (c / "dcp").is_dir() and (c / "tokenizer.json").is_file()
        assert is_adapter_only(c)
        state = read_trainer_state(c)
        assert state["hf_export"] is False
        # The checksums list every file there is, no more.
        files = {str(f.relative_to(c)) for f in c.rglob("*") if f.is_file()}
        assert set(state["files"]) == files - {TRAINER_STATE}
        assert checkpoint_damage(c) is None and checkpoint_damage(c, resume=False) is None
    final = _ckpt(lora_run, STEPS)
    assert read_trainer_state(final)["hf_export"] is True and not is_adapter_only(final)
    assert "model.safetensors" in read_trainer_state(final)["files"]
    assert checkpoint_damage(final) is None
    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    # The merged model is a full fp32 copy; the adapter, r = 8 on the tiny model, is not.
    assert _size(_ckpt(lora_run, 2)) < _size(final) / 2


def test_full_fine_tuning_checkpoints_are_all_hf_directories(full_run):
    for step in range(1, STEPS + 1):
        c = _ckpt(full_run, step)
        assert (c / "model.safetensors").is_file() and (c / "config.json").is_file()
        assert read_trainer_state(c)["hf_export"] is True
        assert hf_dir(c) == c
    assert not (RunDir(full_run).root / "export").exists()


def test_hf_dir_merges_an_adapter_only_checkpoint_once(lora_run, tiny_model_dir, caplog):
    c = _ckpt(lora_run, 2)
    out = hf_dir(c)
    assert out == merged_dir(c) == RunDir(lora_run).export("merged-step-2")
    torch.testing.assert_close(
        _logits(out), _peft_logits(tiny_model_dir, c / "adapter"), rtol=1e-4, atol=1e-4
    )
    assert (_logits(out) - _logits(tiny_model_dir)).abs().max() > 1e-3
    AutoTokenizer.from_pretrained(out)
    assert not list(out.parent.glob(".*.tmp"))  # the temp dir was renamed
    # A second call reuses the merge.
    written = (out / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert hf_dir(c) == out
    assert "merging" not in caplog.text
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    # A merge of another adapter (here: the record says so) is made again.
    source = json.loads((out / SOURCE).read_text())
    (out / SOURCE).write_text(json.dumps({**source, "adapter_sha256": {}}))
    assert hf_dir(c) == out
    assert json.loads((out / SOURCE).read_text()) == source
    # The final checkpoint is an HF directory itself.
    assert hf_dir(_ckpt(lora_run, STEPS)) == _ckpt(lora_run, STEPS)


def test_eval_of_an_interrupted_lora_run_merges_its_newest_checkpoint(lora_run, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(run / "export", ignore_errors=True)
    t = resolve_target(str(run))
    assert t.model == str(run / "export" / "merged-step-2")
    AutoModelForCausalLM.from_pretrained(t.model)
    # The checkpoint stays as it was: still resumable and evaluable.
    assert resumable_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-2"


def test_a_pruned_checkpoint_takes_its_merge_with_it(lora_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    shutil.rmtree(_ckpt(run, STEPS))
    assert hf_dir(_ckpt(run, 2)) == merged_dir(_ckpt(run, 2))  # eval merged step-2
    saved = json.loads(RunDir(run).config.read_text())
    cfg = load_config(
        None,
        [f"--model.path={saved['model']['path']}", f"--run.dir={run}", "--train.lr=1e-2",
         "--train.max_steps=4", "--train.save_every=1", "--train.keep_checkpoints=2",
         "--train.micro_batch_size=4", "--train.lora=true", "--data.eval_fraction=0.3",
         "--train.keep_best=true", "--train.eval_every=1"],
    )  # fmt: skip
    train(cfg, run)  # resumes from step-2; keeps step-3 and step-4
    assert sorted(p.name for p in RunDir(run).checkpoints.glob("step-*")) == ["step-3", "step-4"]
    assert not merged_dir(_ckpt(run, 2)).exists() and not merged_dir(_ckpt(run, 1)).exists()
    assert (run / "checkpoints" / "best").is_dir()  # not a step: never pruned


def test_an_adapter_only_checkpoint_as_a_model_path_names_the_way_out(lora_run):
    with pytest.raises(InputError, match="LoRA checkpoint holding the adapter only") as e:
        resolve_model_path(str(_ckpt(lora_run, 1)))
    assert "export RUN --format hf --checkpoint step-1" in str(e.value)
    assert resolve_model_path(str(_ckpt(lora_run, STEPS))) == _ckpt(lora_run, STEPS)


def test_export_hf_of_a_lora_run(lora_run, tiny_model_dir, tmp_path, capsys):
    # The default: the newest checkpoint, which holds the merged model, copied.
    assert cli_main(["export", str(lora_run), "--format", "hf"]) == 0
    out = RunDir(lora_run).export("hf")
    assert capsys.readouterr().out.strip() == str(out)
    final = _ckpt(lora_run, STEPS)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not {"trainer_state.json", "rng.safetensors", "run_config.json", "dcp", "adapter"} & {
        p.name for p in out.iterdir()
    }
    AutoTokenizer.from_pretrained(out)
    # An adapter-only checkpoint: merged into a standalone directory.
    dest = tmp_path / "step1"
    assert (
        cli_main(["export", str(lora_run), "--format=hf", "--checkpoint=step-1", f"--out={dest}"])
        == 0
    )
    torch.testing.assert_close(
        _logits(dest),
        _peft_logits(tiny_model_dir, _ckpt(lora_run, 1) / "adapter"),
        rtol=1e-4,
        atol=1e-4,
    )
    assert not list(tmp_path.glob(".*.tmp"))
    # Again into the same directory: an earlier export is replaced.
    assert (
        cli_main(["export", str(lora_run), "--format=hf", "--checkpoint=step-2", f"--out={dest}"])
        == 0
    )
    assert json.loads((dest / SOURCE).read_text())["checkpoint"] == "step-2"


def test_export_hf_of_the_best_lora_checkpoint(lora_run, tmp_path):
    best = RunDir(lora_run).checkpoints / "best"
    step = read_trainer_state(best)["step"]  # the lowest validation loss: here the last step
    assert read_trainer_state(best)["hf_export"] is (step == STEPS)
    # checkpoints/best of a run whose best step came before its last: adapter only.
    run = tmp_path / "earlier-best"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("export"))
    shutil.rmtree(run / "checkpoints" / "best")
    shutil.copytree(_ckpt(run, 1), run / "checkpoints" / "best")
    for name in ("step-1", "best"):
        dest = tmp_path / name
        assert (
            cli_main(["export", str(run), "--format=hf", f"--checkpoint={name}", f"--out={dest}"])
            == 0
        )
        assert json.loads((dest / SOURCE).read_text())["checkpoint"] == name
    torch.testing.assert_close(
        _logits(tmp_path / "best"), _logits(tmp_path / "step-1"), rtol=0, atol=0
    )
    assert hf_dir(run / "checkpoints" / "best") == run / "export" / "merged-best"


def test_export_hf_of_a_full_run(full_run, tmp_path):
    dest = tmp_path / "full"
    assert (
        cli_main(
            [
                "export",
                str(full_run),
                "--format",
                "hf",
                "--checkpoint",
                "step-2",
                "--out",
                str(dest),
            ]
        )
        == 0
    )
    torch.testing.assert_close(_logits(dest), _logits(_ckpt(full_run, 2)), rtol=0, atol=0)
    assert (dest / "tokenizer.json").is_file() and not (dest / "dcp").exists()
    AutoTokenizer.from_pretrained(dest)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint=step-9"], "field '--checkpoint': no checkpoint step-9 in"),
        (["--checkpoint=latest"], "field '--checkpoint': 'latest': expected step-N or best"),
        (["--format=trl", "--checkpoint=step-1"], "field '--checkpoint': only with --format hf"),
        (["--out={occupied}"], "field '--out': "),
    ],
)
def test_export_hf_refuses_bad_arguments_in_one_line(lora_run, tmp_path, capsys, args, message):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    args = [a.format(occupied=occupied) for a in args]
    fmt = [] if any(a.startswith("--format") for a in args) else ["--format=hf"]
    assert cli_main(["export", str(lora_run), *fmt, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert (occupied / "notes.txt").read_text() == "mine"


def test_export_hf_of_a_damaged_checkpoint_is_refused(lora_run, tmp_path, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("export"))
    weights = _ckpt(run, 1) / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # bytes zeroed at the same size
        f.seek(size - 64)
        f.write(b"\0" * 64)
    assert "adapter_model.safetensors: contents differ" in checkpoint_damage(_ckpt(run, 1))
    assert cli_main(["export", str(run), "--format=hf", "--checkpoint=step-1"]) == 2
    assert "field '--checkpoint': step-1 is damaged" in capsys.readouterr().err
    # The final (merged) checkpoint damaged: eval and export fall back to step-2 and merge it.
    merged = _ckpt(run, STEPS) / "model.safetensors"
    os.truncate(merged, merged.stat().st_size // 2)
    assert "truncated" in checkpoint_damage(_ckpt(run, STEPS), resume=False)
    assert resumable_checkpoint(run / "checkpoints", resume=False) == _ckpt(run, 2)
    assert cli_main(["export", str(run), "--format=hf"]) == 0
    assert json.loads((RunDir(run).export("hf") / SOURCE).read_text())["checkpoint"] == "step-2"
