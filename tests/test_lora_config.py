"""A full peft LoraConfig through train.lora_config (a TOML table or JSON) and
train.lora_config_file (a JSON file, e.g. a peft adapter_config.json)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from ssrengine.core.config import TrainConfig
from ssrengine.core.config_load import load_config
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows
from ssrengine.models.lora import apply, lora_config
from ssrengine.training.trainer import train
from tests.test_trainer import rehearsal
from tests.tiny import write_jsonl

FULL = {
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": ["embed_tokens"],
    "use_dora": True,
    "use_rslora": True,
    "lora_dropout": 0.0,
    "bias": "lora_only",
}


def test_any_lora_config_field_from_a_toml_table(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        "[train]\nlora = true\nlora_r = 4\n"
        'lora_config = {use_dora = true, use_rslora = true, modules_to_save = ["embed_tokens"], '
        'bias = "lora_only", target_modules = ["q_proj", "v_proj"], lora_dropout = 0.0}\n'
    )
    c = lora_config(load_config(p).train)
    assert (c.use_dora, c.use_rslora, c.bias, c.lora_dropout, c.r) == (
        True,
        True,
        "lora_only",
        0.0,
        4,  # train.lora_r stays where the table does not set r
    )
    assert set(c.target_modules) == {"q_proj", "v_proj"}
    assert c.modules_to_save == ["embed_tokens"]


def test_a_json_file_like_peft_writes_then_the_table_over_it(tmp_path):
    f = tmp_path / "adapter_config.json"
    saved = {**FULL, "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "x"}
    f.write_text(json.dumps(saved))
    c = lora_config(TrainConfig(lora_config_file=str(f), lora_config='{"use_dora": false}'))
    assert c.use_rslora and not c.use_dora and c.bias == "lora_only"


@pytest.mark.parametrize(
    ("t", "message"),
    [
        (TrainConfig(lora_config='{"use_droa": true}'), "'use_droa' is not a peft LoraConfig field .did you mean 'use_dora'"),
        (TrainConfig(lora_config='{"task_type": "SEQ_CLS"}'), "trains causal LMs"),
        (TrainConfig(lora_config='{"layers_to_transform": [0]}'), "peft refused it: .layers_to_transform. cannot be used when .target_modules. is a str"),
    ],
)  # fmt: skip
def test_bad_lora_fields_are_one_line(t, message):
    with pytest.raises(InputError, match=message) as e:
        lora_config(t)
    assert e.value.field == "train.lora_config"


def test_dora_and_modules_to_save_reach_the_model_and_train(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply(model, TrainConfig(lora_config=json.dumps(FULL)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert not any("k_proj.lora" in n for n in trainable)  # only q_proj, v_proj adapted
    # And a run trains with it (the fused loss, checkpoints, the merged export).
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "rehearsal.jsonl", [r.to_json() for r in rehearsal(8)])
    args = [f"--model.path={tiny_model_dir}", f"--run.dir={run}", "--train.lora"]
    args += ["--train.max_steps=3", "--train.lr=1e-2", "--train.loss_impl=naive"]
    args += [f"--train.lora_config={json.dumps(FULL)}", "--train.warmup_steps=0"]
    final = train(load_config(None, args), run)
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["use_rslora"] and adapter["bias"] == "lora_only"
    losses = [r["loss"] for r in read_rows(run / "metrics.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0]
