import json

import pytest

from ssrengine.config import Config, load_config, markdown_table
from ssrengine.errors import InputError


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nmax_steps = 7\nlr = 1e-4\n[run]\nmode = "sft"\n')
    cfg = load_config(p, ["--train.seed=3", "--model.path", "/x", "--train.packing=false"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.seed) == (7, 1e-4, 3)
    assert cfg.run.mode == "sft" and cfg.model.path == "/x" and cfg.train.packing is False


def test_int_promoted_to_float(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 1\n")
    assert load_config(p).train.lr == 1.0


@pytest.mark.parametrize(
    ("toml", "overrides", "needle"),
    [
        (
            "[train]\nmax_step = 3\n",
            [],
            "unknown key in [train] 'max_step' (did you mean 'max_steps'?)",
        ),
        ("[trian]\n", [], "unknown config section 'trian' (did you mean 'train'?)"),
        ("[train]\nmax_steps = 'ten'\n", [], "train.max_steps: expected int"),
        ("[run]\nmode = 'rl'\n", [], "run.mode: must be one of 'ssr', 'sft'"),
        ("", ["--train.bogus=1"], "unknown key in [train] 'bogus'"),
        ("", ["--train.max_steps=abc"], "expected int, got 'abc'"),
        ("", ["train.max_steps=3"], "expected --section.field=value"),
        ("[train\n", [], "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, toml, overrides, needle):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(InputError) as e:
        load_config(p, overrides)
    assert needle in str(e.value)
    assert str(p) in str(e.value) or "command line" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_saved_config_round_trips(tmp_path):
    from ssrengine.config import config_from_json

    cfg = load_config(None, ["--train.max_steps=5"])
    cfg.save(tmp_path / "config.json")
    assert config_from_json(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 5


def test_demo_config_loads_and_every_key_is_documented():
    cfg = load_config("configs/demo.toml")
    assert isinstance(cfg, Config)
    table = markdown_table()
    for sec, values in cfg.to_dict().items():
        for key in values:
            assert f"`{sec}.{key}`" in table


def test_readme_config_table_is_current():
    """The README's config reference is the generated table, verbatim."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python -m ssrengine config --markdown"
