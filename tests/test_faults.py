"""Every fault ends in one clear line and exit 2, losing nothing: a table of bad inputs, each run
through the real command line (``python -m ssrengine ...`` in a subprocess).

A new case is one line of CASES: the command (``{cfg}``, ``{run}``, ``{model}``, ``{data}``,
``{tmp}`` are filled in), a fragment the error line must contain, an optional setup that breaks
something first, and the files that must be byte-identical afterwards. Every case also checks
that stderr holds no traceback and exactly one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ssrengine.core.io import read_rows
from tests.tiny import records, write_jsonl

BASE_TOML = """\
[model]
path = "{model}"
device = "cpu"
[data]
train_file = "{data}"
max_seq_len = 256
[generation]
max_new_tokens = 8
batch_size = 8
[run]
dir = "{run}"
[train]
max_steps = 1
warmup_steps = 0
max_tokens = 256
"""
TAIL_LINE = BASE_TOML.count("\n") + 1  # the first line a case appends (to [train])


@dataclass
class Ctx:
    """One case's sandbox: ``tmp`` holds data.jsonl, c.toml and the run dir."""

    tmp: Path
    model: Path
    vars: dict[str, str] = field(default_factory=dict)
    toml_tail: bytes = b""
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def format(self, text: str) -> str:
        return text.format(
            cfg=self.tmp / "c.toml",
            run=self.run,
            model=self.model,
            data=self.tmp / "data.jsonl",
            tmp=self.tmp,
            **self.vars,
        )

    def write_config(self) -> None:
        (self.tmp / "c.toml").write_bytes(self.format(BASE_TOML).encode() + self.toml_tail)


def cli(ctx: Ctx, args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HF_HUB_OFFLINE"] = "1"
    argv = [sys.executable, "-m", "ssrengine", *ctx.format(args).split()]
    return subprocess.run(
        argv, cwd=ctx.tmp, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---- setups: each breaks one thing in a case's sandbox ----


def own_model(ctx: Ctx) -> Path:
    """A private copy of the tiny model that the case may damage."""
    dst = ctx.tmp / "model"
    shutil.copytree(ctx.model, dst)
    ctx.model = dst
    return dst


def truncate_weights(ctx: Ctx) -> None:
    p = own_model(ctx) / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garbage_header(ctx: Ctx) -> None:
    p = own_model(ctx) / "model.safetensors"
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    p.write_bytes(data[:8] + b"#" * n + data[8 + n :])


def random_weights(ctx: Ctx) -> None:
    (own_model(ctx) / "model.safetensors").write_bytes(os.urandom(4096))


def remove(*names: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        model = own_model(ctx)
        for name in names:
            (model / name).unlink()

    return setup


def model_file(name: str, content: bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (own_model(ctx) / name).write_bytes(content)

    return setup


def file(path: str, content: bytes) -> Callable[[Ctx], None]:
    """Write ``content`` to ``path`` (relative to the sandbox)."""

    def setup(ctx: Ctx) -> None:
        p = ctx.tmp / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)

    return setup


def toml_tail(content: bytes) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        ctx.toml_tail = content

    return setup


def latin1_data(ctx: Ctx) -> None:
    rows = records(4)
    rows[1]["documents"][0]["text"] = "Acme was founded in Zürich."
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (ctx.tmp / "data.jsonl").write_bytes(text.encode("latin-1"))


def _gen_row(i: str, response: str) -> dict:
    return {"id": i, "response": response, "token_ids": [5], "finish_reason": "stop"}


GEN_BAD_UTF8 = (
    (json.dumps(_gen_row("ex-000", "fine")) + "\n" + json.dumps(_gen_row("ex-001", "caf@")) + "\n")
    .encode()
    .replace(b"caf@", b"caf\xe9")
)
GEN_ARRAY = (json.dumps(_gen_row("ex-000", "fine")) + "\n[1, 2]\n").encode()
GEN_OFFSET = len(json.dumps(_gen_row("ex-000", "fine")) + "\n") + GEN_BAD_UTF8.split(b"\n")[
    1
].index(b"\xe9")


def mount_tmpfs(ctx: Ctx, path: Path, size_kib: int, *, readonly: bool = False) -> bool:
    """A real small filesystem at ``path`` (needs root); False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kib}k" + (",ro" if readonly else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if r.returncode == 0:
        ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
    return r.returncode == 0


def need_tmpfs(ctx: Ctx, path: Path, size_kib: int) -> None:
    if not mount_tmpfs(ctx, path, size_kib):
        # Without root the io tests still inject ENOSPC into the same writes in-process.
        pytest.skip("mounting a small tmpfs needs root")


def readonly_run_fs(ctx: Ctx) -> None:
    if not mount_tmpfs(ctx, ctx.run, 64, readonly=True):
        ctx.run.chmod(0o555)  # not root: a directory we may not write is the same fault
        ctx.cleanups.append(lambda: ctx.run.chmod(0o755))


def _leave_free(path: Path, pages: int) -> Path:
    st = os.statvfs(path)
    filler = path / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - pages * st.f_frsize))
    return filler


def full_disk_for_generate(ctx: Ctx) -> None:
    """Room for config.json, .lock and one page of generations.jsonl: some rows, then ENOSPC."""
    write_jsonl(ctx.tmp / "data.jsonl", records(24))
    need_tmpfs(ctx, ctx.run, 256)
    ctx.vars["filler"] = str(_leave_free(ctx.run, 3))


def full_disk_for_checkpoint(ctx: Ctx) -> None:
    need_tmpfs(ctx, ctx.run, 2048)
    ctx.write_config()
    r = cli(ctx, "build --config {cfg} --run.mode=sft")
    assert r.returncode == 0, r.stderr
    ctx.vars["filler"] = str(_leave_free(ctx.run, 16))  # 64 KiB: far less than a checkpoint


def hold_lock(ctx: Ctx) -> None:
    """Another process holds the run directory, as a running command does."""
    code = (
        "import sys; from ssrengine.core.runlock import lock_run_dir\n"
        "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(ctx.run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ctx.cleanups.append(lambda: (holder.kill(), holder.wait()))
    assert holder.stdout.readline().strip() == "locked"
    ctx.vars["holder"] = str(holder.pid)


def trained_checkpoint(damage: Callable[[Path], None]) -> Callable[[Ctx], None]:
    """A finished one-step sft run whose only checkpoint, step-1, ``damage`` then breaks."""

    def setup(ctx: Ctx) -> None:
        ctx.write_config()
        for stage in ("build", "train"):
            r = cli(ctx, stage + " --config {cfg} --run.mode=sft")
            assert r.returncode == 0, r.stderr
        damage(ctx.run / "checkpoints" / "step-1")

    return setup


def _dcp_shard(ckpt: Path) -> Path:
    return next((ckpt / "dcp").glob("*.safetensors"))


def _cut(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-64])


def run_dir_with_generations(extra: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        file("run/generations.jsonl", GEN_BAD_UTF8.replace(b"\xe9", b"e"))(ctx)
        extra(ctx)

    return setup


@dataclass(frozen=True)
class Case:
    id: str
    args: str
    fragment: str
    setup: Callable[[Ctx], None] | None = None
    keep: tuple[str, ...] = ()  # sandbox files that must be byte-identical afterwards
    rc: int = 2


T = "train --config {cfg} "
G = "generate --config {cfg} "
CASES = [
    # config values: each field's range, named, before any work
    Case("epochs=0", T + "--train.max_steps=0 --train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    Case("max_steps=-3", T + "--train.max_steps=-3", "train.max_steps: must be >= 0, got -3"),
    Case("eval_fraction=1", T + "--data.eval_fraction=1", "data.eval_fraction: must be >= 0 and < 1"),
    Case("report_to", T + "--train.report_to=mlfow", "train.report_to: each must be one of"),
    Case("lr=nan", T + "--train.lr=nan", "train.lr: must be a finite number, got nan"),
    Case("lr=inf", T + "--train.lr=inf", "train.lr: must be a finite number, got inf"),
    Case("lr=0", T + "--train.lr=0", "train.lr: must be > 0 and <= 1e+06, got 0.0"),
    Case("micro_batch=0", T + "--train.micro_batch_size=0", "train.micro_batch_size: must be >= 1"),
    Case("gen_batch=0", G + "--generation.batch_size=0", "generation.batch_size: must be >= 1"),
    Case("grad_accum=0", T + "--train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    Case("save_every=-1", T + "--train.save_every=-1", "train.save_every: must be >= 0, got -1"),
    Case("max_new=-1", G + "--generation.max_new_tokens=-1", "generation.max_new_tokens: must be >= 1"),
    Case("temp=-1", G + "--generation.temperature=-1", "generation.temperature: must be >= 0"),
    Case("top_p=0", G + "--generation.top_p=0", "generation.top_p: must be > 0 and <= 1, got 0.0"),
    Case("threshold=nan", "judge --config {cfg} --judge.threshold=nan", "judge.threshold: must be a finite"),
    Case("min_f1=2", "judge --config {cfg} --judge.min_f1=2", "judge.min_f1: must be >= 0 and <= 1"),
    Case("max_examples=-1", G + "--data.max_examples=-1", "data.max_examples: must be >= 0, got -1"),
    Case("max_grad_norm=nan", T + "--train.max_grad_norm=nan", "train.max_grad_norm: must be a finite"),
    Case("beta2=1", T + "--train.adam_beta2=1", "train.adam_beta2: must be >= 0 and < 1, got 1.0"),
    Case("keep=-1", T + "--train.keep_checkpoints=-1", "train.keep_checkpoints: must be >= 0"),
    Case("lora_r=0", T + "--train.lora_r=0", "train.lora_r: must be >= 1, got 0"),
    Case("device", G + "--model.device=gpu", "model.device: got 'gpu', expected a value matching"),
    Case("empty run.dir", G + "--run.dir=", "run.dir: must not be empty"),
    Case("choice", G + "--run.mode=rl", "run.mode: must be one of 'ssr', 'sft', got 'rl'"),
    Case("bins < seq", T + "--data.max_seq_len=512", "train.max_tokens=256 is smaller than data.max_seq_len=512"),
    Case("http no url", G + "--generation.backend=openai", "generation.backend = 'openai' needs generation.url"),
    Case("toml range", T, "c.toml: train.lr: must be > 0 and <= 1e+06, got -1.0", toml_tail(b"lr = -1\n")),
    Case("toml type", T, "c.toml: train.packing: expected bool, got 3", toml_tail(b"packing = 3\n")),
    # encodings: file, line and byte offset
    Case("toml latin-1", T, f"c.toml:{TAIL_LINE}: not valid UTF-8: byte 0xfc at byte offset", toml_tail("# Zürich\n".encode("latin-1"))),
    Case("data latin-1", G, "data.jsonl:2: not valid UTF-8: byte 0xfc", latin1_data, ("data.jsonl",)),
    Case("gens non-utf8 (generate)", G, f"generations.jsonl:2: not valid UTF-8: byte 0xe9 at byte offset {GEN_OFFSET}", file("run/generations.jsonl", GEN_BAD_UTF8), ("run/generations.jsonl",)),
    Case("gens non-utf8 (judge)", "judge --config {cfg}", "generations.jsonl:2: not valid UTF-8", file("run/generations.jsonl", GEN_BAD_UTF8), ("run/generations.jsonl",)),
    Case("gens array row", "judge --config {cfg}", "generations.jsonl:2: corrupt row", file("run/generations.jsonl", GEN_ARRAY), ("run/generations.jsonl",)),
    # model directories: the broken file named
    Case("truncated weights", G, "model.safetensors: truncated or damaged", truncate_weights),
    Case("garbage header", G, "model.safetensors: corrupt safetensors header", garbage_header),
    Case("random weights", G, "model.safetensors: not a safetensors file or truncated", random_weights),
    Case("no weights", G, "model: no weights file: expected model.safetensors", remove("model.safetensors")),
    Case("no tokenizer", G, "no tokenizer files", remove("tokenizer.json", "tokenizer_config.json")),
    Case("config.json not JSON", G, "model/config.json:1: not valid JSON", model_file("config.json", b"{oops")),
    Case("tokenizer.json not JSON", G, "model/tokenizer.json:1: not valid JSON", model_file("tokenizer.json", b"[")),
    # run directories
    Case("run.dir is a file", G, "run: field 'run.dir': is a file, not a directory", file("run", b"x"), ("run",)),
    Case("parent is a file", G + "--run.dir={tmp}/p/run", "p: field 'run.dir': is a file, not a directory; run.dir '{tmp}/p/run' cannot be made in it", file("p", b"x"), ("p",)),
    Case("read-only fs", G, "run: field 'run.dir': not writable (read-only file system", readonly_run_fs),
    Case("run config.json corrupt", G, "run/config.json:1: not valid JSON", run_dir_with_generations(file("run/config.json", b"{")), ("run/config.json", "run/generations.jsonl")),
    # checkpoints: the damaged file named; with no undamaged checkpoint left, stop
    Case("skip_nonfinite=-1", T + "--train.skip_nonfinite_steps=-1", "train.skip_nonfinite_steps: must be >= 0, got -1"),
    Case("ckpt rng missing", T + "--run.mode=sft", "{run}/checkpoints/step-1/rng.safetensors: missing", trained_checkpoint(lambda c: (c / "rng.safetensors").unlink()), ("run/checkpoints/step-1/trainer_state.json",)),
    Case("ckpt shard missing", T + "--run.mode=sft", "step-1/dcp/shard-00001-model-00001-of-00001.safetensors: missing", trained_checkpoint(lambda c: _dcp_shard(c).unlink()), ("run/checkpoints/step-1/rng.safetensors",)),
    Case("ckpt shard truncated", T + "--run.mode=sft", "(truncated or overwritten)", trained_checkpoint(lambda c: _cut(_dcp_shard(c))), ("run/checkpoints/step-1/trainer_state.json",)),
    Case("ckpt state corrupt", T + "--run.mode=sft", "{run}/checkpoints/step-1/trainer_state.json: unreadable", trained_checkpoint(lambda c: (c / "trainer_state.json").write_text("{")), ("run/checkpoints/step-1/trainer_state.json",)),
    # changed training settings on a run dir with checkpoints: refused, the changed key named
    Case("resume lora on", T + "--run.mode=sft --train.lora=true", "train.lora: False -> True", trained_checkpoint(lambda c: None), ("run/checkpoints/step-1/trainer_state.json", "run/metrics.jsonl")),
    Case("resume seed", T + "--run.mode=sft --train.seed=1", "train.seed: 0 -> 1", trained_checkpoint(lambda c: None), ("run/checkpoints/step-1/trainer_state.json", "run/metrics.jsonl")),
    Case("resume packing off", T + "--run.mode=sft --train.packing=false", "train.packing: True -> False", trained_checkpoint(lambda c: None), ("run/checkpoints/step-1/trainer_state.json", "run/metrics.jsonl")),
    # a second command on a run directory in use
    Case("locked", G, "run: in use by another run (pid {holder})", run_dir_with_generations(hold_lock), ("run/generations.jsonl",)),
]  # fmt: skip


@pytest.fixture()
def sandbox(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", records(6))
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir)
    yield ctx
    for undo in reversed(ctx.cleanups):
        undo()


def _snapshot(ctx: Ctx, names: tuple[str, ...]) -> dict[str, bytes]:
    return {n: (ctx.tmp / n).read_bytes() for n in names}


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(sandbox, case):
    if case.setup:
        case.setup(sandbox)
    sandbox.write_config()
    before = _snapshot(sandbox, case.keep)
    r = cli(sandbox, case.args)
    assert r.returncode == case.rc, r.stderr
    assert sandbox.format(case.fragment) in _one_error_line(r)
    assert _snapshot(sandbox, case.keep) == before


def _no_temp_files(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if ".tmp" in p.name]


def test_generate_on_full_disk_keeps_rows_and_reruns_exactly(sandbox):
    full_disk_for_generate(sandbox)
    sandbox.write_config()
    r = cli(sandbox, G)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r)
    assert f"{sandbox.run}/generations.jsonl: disk full: writing this needs " in line
    saved = read_rows(sandbox.run / "generations.jsonl")
    assert 0 < len(saved) < 24
    Path(sandbox.vars["filler"]).unlink()
    r = cli(sandbox, G)
    assert r.returncode == 0, r.stderr
    rows = read_rows(sandbox.run / "generations.jsonl")
    assert rows[: len(saved)] == saved
    assert Counter(r["id"] for r in rows) == Counter(f"ex-{i:03d}" for i in range(24))
    assert _no_temp_files(sandbox.run) == []


def test_checkpoint_on_full_disk_is_one_line_and_reruns(sandbox):
    full_disk_for_checkpoint(sandbox)
    r = cli(sandbox, T + "--run.mode=sft")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r)
    assert (
        f"{sandbox.run}/checkpoints/.step-1.tmp: disk full: writing this needs more than " in line
    )
    assert _no_temp_files(sandbox.run) == []
    Path(sandbox.vars["filler"]).unlink()
    r = cli(sandbox, T + "--run.mode=sft")
    assert r.returncode == 0, r.stderr
    assert (sandbox.run / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert _no_temp_files(sandbox.run) == []


def test_second_generate_on_a_busy_run_dir_stops_and_rows_stay_unique(sandbox):
    """Two real `generate` processes on one run dir: the second stops at once, naming the first."""
    write_jsonl(sandbox.tmp / "data.jsonl", records(24))
    sandbox.write_config()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "ssrengine", *sandbox.format(G).split()]
    first = subprocess.Popen(argv, cwd=sandbox.tmp, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lock = sandbox.run / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = cli(sandbox, G)
        assert second.returncode == 2, second.stderr
        assert f"in use by another run (pid {first.pid})" in _one_error_line(second)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    rows = read_rows(sandbox.run / "generations.jsonl")
    assert Counter(r["id"] for r in rows) == Counter(f"ex-{i:03d}" for i in range(24))


def test_line_separators_in_records_survive_every_stage(sandbox):
    """U+2028, U+2029 and U+0085 in documents, questions and gold answers: a full run and its
    resume (which reads every stage file back) finish."""
    rows = records(6)
    for r in rows:
        r["documents"][0]["text"] += " Line\u2028para\u2029next\u0085end."
        r["messages"][-1]["content"] += "\u2028?"
        r["response"] += "\u2029(gold)\u0085"
    write_jsonl(sandbox.tmp / "data.jsonl", rows)
    sandbox.write_config()
    for _ in range(2):
        r = cli(sandbox, "run --config {cfg}")
        assert r.returncode == 0, r.stderr
    rehearsal = read_rows(sandbox.run / "rehearsal.jsonl")
    gold = {r["id"]: r["response"] for r in rows}
    assert any(x["target"] == gold[x["id"]] and "\u2029" in x["target"] for x in rehearsal)
