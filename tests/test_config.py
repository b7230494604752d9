import json

import pytest

from ssrengine.core.config import Config
from ssrengine.core.config_load import load_config, markdown_table
from ssrengine.core.errors import InputError


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
    from ssrengine.core.config_load import config_from_json

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


def test_docs_config_table_is_current():
    """docs/configuration.md's reference is the generated table, verbatim."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert markdown_table() in page, "regenerate it: python -m ssrengine config --markdown"


def _bounded_fields():
    import dataclasses

    from ssrengine.core.config import SECTIONS
    from ssrengine.core.config_load import range_text

    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if range_text(f):
                yield sec, f


@pytest.mark.parametrize(("sec", "f"), list(_bounded_fields()), ids=lambda x: getattr(x, "name", x))
def test_every_range_is_checked_and_documented(sec, f):
    """Each bound rejects the value just past it, naming the field; the docs state the range."""
    from ssrengine.core.config_load import range_text

    key = f"{sec}.{f.name}"
    assert f"| `{key}` |" in markdown_table()
    assert f"Range: {range_text(f)}." in markdown_table().split(f"| `{key}` |")[1].split("\n")[0]
    past = {"ge": -1, "gt": 0, "le": 1, "lt": 0}  # the bound itself is outside for gt / lt
    for name, step in past.items():
        if f.metadata[name] is not None:
            with pytest.raises(InputError, match=rf"<command line>: {key}: must be "):
                load_config(None, [f"--{key}={f.metadata[name] + step}"])
    if f.type == "float":
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(InputError, match=rf"{key}: must be a finite number"):
                load_config(None, [f"--{key}={bad}"])


def test_range_error_names_the_file_or_the_command_line(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nmax_steps = -1\ngrad_accum = 0\n")
    with pytest.raises(InputError, match=r"c\.toml: train\.max_steps: must be >= 0, got -1"):
        load_config(p)
    # the command line fixes one value; the other is still the file's
    with pytest.raises(InputError, match=r"c\.toml: train\.grad_accum: must be >= 1, got 0"):
        load_config(p, ["--train.max_steps=3"])
    with pytest.raises(
        InputError, match=r"<command line>: train\.lr: must be > 0 and <= 1e\+06, got -1\.0"
    ):
        load_config(p, ["--train.max_steps=3", "--train.grad_accum=1", "--train.lr=-1"])


def test_choices_come_from_literal_types():
    import typing

    from ssrengine.core.config import TrainConfig

    hint = typing.get_type_hints(TrainConfig)["parallel"]
    assert typing.get_args(hint) == ("fsdp", "ddp")
    with pytest.raises(
        InputError, match=r"train\.parallel: must be one of 'fsdp', 'ddp', got 'tp'"
    ):
        load_config(None, ["--train.parallel=tp"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["--data.max_seq_len=4096"], "train.max_tokens=2048 is smaller than data.max_seq_len"),
        (["--generation.backend=sglang-http"], "needs generation.url"),
        (["--judge.kind=llm", "--judge.backend=openai"], "needs judge.url or generation.url"),
    ],
)
def test_cross_field_checks(overrides, needle):
    with pytest.raises(InputError, match=needle):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--data.max_seq_len=4096", "--train.packing=false"],
        ["--generation.backend=sglang-http", "--generation.launch=true"],
        ["--judge.kind=llm", "--judge.backend=openai", "--generation.url=http://h:1"],
    ],
)
def test_cross_field_checks_accept_the_valid_combination(overrides):
    load_config(None, overrides)


def test_non_utf8_config_names_line_and_offset(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"[train]\nmax_steps = 3 # caf\xe9\n")
    with pytest.raises(
        InputError, match=r"c\.toml:2: not valid UTF-8: byte 0xe9 at byte offset 27"
    ):
        load_config(p)


def test_list_key_from_toml_list_or_commas(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nreport_to = ["tensorboard"]\n')
    assert load_config(p).train.report_to == ("tensorboard",)
    cfg = load_config(None, ["--train.report_to=tensorboard, wandb"])
    assert cfg.train.report_to == ("tensorboard", "wandb")
    assert load_config(None).train.report_to == ()
    with pytest.raises(InputError, match=r"train\.report_to: each must be one of .*got 'mlflow'"):
        load_config(None, ["--train.report_to=mlflow"])
    path = tmp_path / "config.json"
    cfg.save(path)
    from ssrengine.core.config_load import config_from_json

    assert config_from_json(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["--data.eval_file=x.jsonl", "--data.eval_fraction=0.1"], "not both"),
        (["--train.keep_best"], "train.keep_best needs validation data"),
    ],
)
def test_validation_settings_that_cannot_work(overrides, needle):
    with pytest.raises(InputError, match=needle):
        load_config(None, overrides)
