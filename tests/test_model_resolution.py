"""model.path as a Hub id resolved offline through a Hugging Face cache built here in the real
layout; model.chat_template everywhere a tokenizer loads; no transformers bars under ours."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import ssrengine
import ssrengine.models.fetch as fetch_mod
from ssrengine.core.config import ModelConfig
from ssrengine.core.errors import InputError
from ssrengine.data.records import render_prompt
from ssrengine.generation.hf import HFGenerator
from ssrengine.models.fetch import resolve_model_path, resolve_once
from ssrengine.models.loading import load_model, load_tokenizer
from tests.tiny import records, write_jsonl

REPO = "tiny-org/Tiny-Chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _repo_dir(root, repo=REPO):
    return root / f"models--{repo.replace('/', '--')}"


def build_hub_cache(root, model_dir, repo=REPO):
    """huggingface_hub's cache layout: blobs by content hash, a snapshot of symlinks into
    them per commit, refs/main naming the commit (huggingface_hub/file_download.py)."""
    repo_dir = _repo_dir(root, repo)
    snap = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snap


def _offline_hub(tmp_path, monkeypatch, model_dir):
    """REPO in a Hugging Face cache at tmp_path/hub that is the one used, offline."""
    snap = build_hub_cache(tmp_path / "hub", model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_hub_id_resolves_through_the_cache(tmp_path, monkeypatch, tiny_model_dir):
    snap = _offline_hub(tmp_path, monkeypatch, tiny_model_dir)
    assert resolve_model_path(REPO) == snap
    tok = load_tokenizer(REPO)
    model = load_model(REPO, device="cpu")
    assert (tok.chat_template and model.config.vocab_size == len(tok)) or model is not None


def test_hub_id_not_cached_is_one_line(tmp_path, monkeypatch, tiny_model_dir):
    build_hub_cache(tmp_path / "hub", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError) as e:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert msg.startswith("field 'model.path': 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in")
    assert str(tmp_path / "hub") in msg and "hf download" in msg and "\n" not in msg


def test_local_directory_wins_over_a_hub_id_of_the_same_name(tmp_path, monkeypatch, tiny_model_dir):
    local = tmp_path / "tiny-org" / "Tiny-Chat"
    shutil.copytree(tiny_model_dir, local)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert resolve_model_path(REPO).resolve() == local.resolve()


MSGS = [{"role": "user", "content": "When was Acme founded?"}]


def test_chat_template_string_and_file_override(tmp_path, tiny_model_dir):
    own = render_prompt(load_tokenizer(str(tiny_model_dir)), MSGS)
    by_text = load_tokenizer(str(tiny_model_dir), chat_template=TEMPLATE)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    by_file = load_tokenizer(str(tiny_model_dir), chat_template=str(tmp_path / "t.jinja"))
    want = "[user] When was Acme founded?\n[assistant] "
    assert render_prompt(by_text, MSGS) == render_prompt(by_file, MSGS) == want != own


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("templates/missing.jinja", "is neither a file nor a Jinja template"),
        ("{ not a template }", "not a Jinja chat template"),
    ],
)
def test_bad_chat_template_is_one_line(tiny_model_dir, spec, needle):
    with pytest.raises(InputError, match=rf"^field 'model.chat_template': .*{needle}"):
        load_tokenizer(str(tiny_model_dir), chat_template=spec)


def test_a_tokenizer_without_template_takes_one_from_the_config(tmp_path, tiny_model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = bare / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"no chat template; give one with model\.chat_template"):
        load_tokenizer(str(bare))
    assert render_prompt(load_tokenizer(str(bare), chat_template=TEMPLATE), MSGS).startswith(
        "[user]"
    )


def test_generator_renders_with_the_configured_template(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), chat_template=TEMPLATE)
    model = ModelConfig(path=str(tiny_model_dir), device="cpu", chat_template=TEMPLATE)
    gen = HFGenerator(model)
    want = tok(render_prompt(tok, MSGS), add_special_tokens=False)["input_ids"]
    assert gen.tokenize(MSGS) == want


def test_loading_shows_no_transformers_bar(capfd, tiny_model_dir):
    hf_logging.enable_progress_bar()
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))  # the bar we keep out
    assert "Loading weights" in capfd.readouterr().err
    load_model(str(tiny_model_dir), device="cpu")
    load_tokenizer(str(tiny_model_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is back


def _move_main(hub, model_dir, commit):
    """A second snapshot of REPO, made the one refs/main names (a newer download)."""
    repo_dir = _repo_dir(hub)
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_a_command_resolves_its_model_once(tmp_path, monkeypatch, tiny_model_dir):
    first = _offline_hub(tmp_path, monkeypatch, tiny_model_dir)
    with resolve_once():
        assert resolve_model_path(REPO) == first
        newer = _move_main(tmp_path / "hub", tiny_model_dir, "f" * 40)
        with resolve_once():  # nested: the outer command's resolution
            assert resolve_model_path(REPO) == first
        assert load_tokenizer(REPO).name_or_path == str(first)
    assert resolve_model_path(REPO) == newer  # the next command sees the cache as it is now


def test_the_pipeline_resolves_model_path_once(tmp_path, monkeypatch, tiny_model_dir):
    """prepare, the generator (tokenizer + model) and the trainer (tokenizer + model) all
    used to resolve model.path themselves: five resolutions per run."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    calls = []
    resolve = fetch_mod._resolve
    monkeypatch.setattr(fetch_mod, "_resolve", lambda p: calls.append(p) or resolve(p))
    config = {
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train_file": str(write_jsonl(tmp_path / "train.jsonl", records(4)))},
        "generation": {"max_new_tokens": 4},
        "train": {"max_steps": 1},
        "run": {"dir": str(tmp_path / "run"), "mode": "ssr"},
    }
    ssrengine.run(config)
    assert calls == [str(tiny_model_dir)]
