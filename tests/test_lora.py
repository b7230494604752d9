"""LoRA through peft: training lowers the loss on the tiny model, the final checkpoint holds a
peft adapter and a merged HF export that transformers reloads with the adapter's exact
function, and a LoRA run resumed from an adapter-only checkpoint (adapter + AdamW state from
DCP, dropout RNG) is bit-identical. tests/test_lora_export.py: the adapter-only checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import AutoModelForCausalLM

from ssrengine.core.config_load import load_config
from ssrengine.core.io import read_rows
from ssrengine.models.lora import lora_config
from ssrengine.training.trainer import train
from tests.test_checkpoint import pickled_files
from tests.tiny import records, write_jsonl

STEPS = 8


def _args(tiny, run_dir):
    return [
        f"--model.path={tiny}",
        f"--run.dir={run_dir}",
        "--train.lora=true",
        "--train.lr=1e-2",
        f"--train.max_steps={STEPS}",
        "--train.save_every=4",
        "--train.micro_batch_size=4",
    ]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora")
    write_jsonl(
        run_dir / "rehearsal.jsonl",
        [{**r, "target": r["response"], "source": "gold"} for r in records(16)],
    )
    final = train(load_config(None, _args(tiny_model_dir, run_dir)), run_dir)
    return run_dir, final


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # peft
def test_lora_reduces_loss_and_merged_export_reloads(lora_run, tiny_model_dir):
    from peft import PeftModel

    run_dir, final = lora_run
    losses = [r["loss"] for r in read_rows(run_dir / "metrics.jsonl")]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.2, losses

    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    exported = load_file(str(final / "model.safetensors"))
    assert not any("lora" in k for k in exported)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed and all("proj" in k for k in changed)  # only adapted linears moved

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), final / "adapter"
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (merged, with_adapter, plain))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-3


def test_lora_resume_is_exact(lora_run, tiny_model_dir, tmp_path):
    run_dir, final = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    # What is resumed from: the adapter and the trainer state, no merged model.
    middle = resumed / "checkpoints" / f"step-{STEPS // 2}"
    assert (middle / "dcp").is_dir() and not (middle / "model.safetensors").exists()
    out = train(load_config(None, _args(tiny_model_dir, resumed)), resumed, require_resume=True)
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(final / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(
                a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k, n=name: f"{n} {k}: {m}"
            )
    # Resuming needs only the trainable weights: the frozen base stays out of dcp/.
    meta = HuggingFaceStorageReader(str(final / "dcp")).read_metadata()
    weights = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert weights and all(".lora_" in k for k in weights)
    assert pickled_files(run_dir / "checkpoints") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all-linear", "all-linear"),
        ("q_proj, v_proj", {"q_proj", "v_proj"}),
        ("o_proj", {"o_proj"}),
    ],
)
def test_target_modules_key(value, expected):
    cfg = load_config(None, [f"--train.lora_target_modules={value}", "--train.lora_r=4"])
    lc = lora_config(cfg.train)
    assert lc.r == 4
    assert lc.target_modules == expected
