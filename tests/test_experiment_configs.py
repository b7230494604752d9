"""The experiment's configs load, and each LoRA variant differs from its full fine-tuning
config only in the LoRA settings, the learning rate and the run directory."""

import pytest

from ssrengine.core.config_load import load_config
from ssrengine.core.provenance import flat_config


@pytest.mark.parametrize("name", ["sft", "ssr"])
def test_lora_variant_changes_only_lora(name):
    full = flat_config(load_config(f"configs/experiment_{name}.toml").to_dict())
    lora = flat_config(load_config(f"configs/experiment_{name}_lora.toml").to_dict())
    changed = {k for k in full if full[k] != lora[k]}
    assert changed == {"train.lora", "train.lr", "run.dir"}
    assert lora["train.lora"] is True and lora["train.lora_r"] == 8
    assert lora["run.dir"] == full["run.dir"] + "-lora"
