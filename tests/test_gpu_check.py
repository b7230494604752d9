"""benchmarks/gpu_check.py (`make gpu-check`), everything that runs without a GPU: a step's
whole process group dies on a timeout and after the step, pytest's junit XML (from a real
pytest run) judged with required skips as failures and SGLang's as not run, the SSR run's
loss and MFU checks, the summary table, and the exit status without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_dead(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


# A step that starts a grandchild (as SGLang's server starts its workers), records its pid,
# then sleeps (or exits at once with "exit").
STEP = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(sys.argv[1], "w").write(str(child.pid))
    print("started", flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(300)
    """
)


@pytest.mark.parametrize("mode", ["sleep", "exit"])
def test_a_step_kills_its_whole_process_group(tmp_path, mode):
    """On a timeout (sleep) the step and its grandchild die; a step that ends (exit) leaves
    no grandchild behind either."""
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    step = gc.run_step("probe", [sys.executable, "-c", STEP, str(pid_file), mode], limit=5)
    grandchild = int(pid_file.read_text())
    assert _wait_dead(grandchild), "the grandchild survived"
    assert "started" in step["output"]
    if mode == "sleep":
        assert step["timed_out"] and not step["ok"] and step["returncode"] is None
        assert "process group killed" in step["tail"]
    else:
        assert step["ok"] and not step["timed_out"]
        assert time.monotonic() - t0 < 30, "waited for the grandchild instead of the step"


def test_the_quick_tier_deadline_bounds_every_step():
    clock = gc.Clock(100)
    assert 99 <= clock.limit(150) <= 100 and clock.limit(30) == 30
    assert gc.Clock(None).limit(150) == 150
    assert gc.Clock(-5).limit(150) == 1.0  # past the deadline: a step still gets a second
    assert sum(gc.QUICK_LIMITS.values()) < gc.QUICK_SECONDS


# ----------------------------------------------------------------------------- pytest step
GPU_TESTS = textwrap.dedent(
    """
    import pytest

    def test_passes():
        pass

    def test_flash():
        pytest.importorskip("no_such_flash_attn_module")

    def test_sglang_engine():
        pytest.skip("could not import 'sglang': No module named 'sglang'")
    """
)


def _junit(tmp_path: Path, source: str) -> tuple[str, int]:
    (tmp_path / "test_probe.py").write_text(source)
    xml = tmp_path / "out.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return xml.read_text(), proc.returncode


def test_a_skipped_required_test_fails_and_sglang_is_listed_as_not_run(tmp_path):
    xml, rc = _junit(tmp_path, GPU_TESTS)
    assert rc == 0, "pytest itself passes: skips are not failures to it"
    verdict = gc.judge_tests(gc.junit_outcomes(xml), rc)
    assert not verdict["ok"] and verdict["passed"] == 1
    [problem] = verdict["problems"]
    assert "required test skipped" in problem and "test_flash" in problem
    [not_run] = verdict["not_run"]
    assert "test_sglang_engine" in not_run


def test_all_required_tests_passing_is_a_pass(tmp_path):
    xml, rc = _junit(tmp_path, GPU_TESTS.replace('"no_such_flash_attn_module"', '"json"'))
    verdict = gc.judge_tests(gc.junit_outcomes(xml), rc)
    assert verdict["ok"] and verdict["passed"] == 2 and len(verdict["not_run"]) == 1


def test_a_failed_test_or_nothing_run_fails(tmp_path):
    xml, rc = _junit(tmp_path, "def test_fails():\n    assert False\n")
    verdict = gc.judge_tests(gc.junit_outcomes(xml), rc)
    assert not verdict["ok"] and verdict["failed"] == 1
    empty = gc.judge_tests([], 5)  # pytest's "no tests collected"
    assert not empty["ok"] and "no GPU test passed" in empty["problems"]


# -------------------------------------------------------------------------------- SSR run
def _rows(losses, mfu=0.1, tps=5000.0):
    return [dict(step=i + 1, loss=x, mfu=mfu, tokens_per_s=tps) for i, x in enumerate(losses)]


H100 = "NVIDIA H100 80GB HBM3"


def test_the_ssr_run_passes_when_the_loss_falls_above_the_mfu_floor():
    v = gc.judge_run(_rows([3.0, 2.9, 2.8, 2.5, 2.2, 2.0, 1.9]), H100)
    assert v["ok"] and v["loss_falls"] and v["mfu_median"] == 0.1 and v["mfu_floor"] == 0.02


@pytest.mark.parametrize(
    "rows,problem",
    [
        (_rows([2.0, 2.1, 2.0, 2.2, 2.3, 2.4]), "loss did not fall"),
        (_rows([3.0, float("nan"), 2.0, 1.9, 1.8, 1.7]), "non-finite loss"),
        (_rows([3.0, 2.9, 2.8, 2.5, 2.2, 2.0], mfu=0.005), "below the floor"),
        ([], "no metrics rows"),
    ],
    ids=["flat", "nan", "slow", "empty"],
)
def test_the_ssr_run_fails(rows, problem):
    v = gc.judge_run(rows, H100)
    assert not v["ok"] and any(problem in p for p in v["problems"]), v["problems"]


def test_an_unknown_gpu_has_no_mfu_to_check():
    v = gc.judge_run(_rows([3.0, 2.9, 2.8, 2.5, 2.2, 2.0], mfu=None), "Some Future GPU")
    assert v["ok"] and v["mfu_median"] is None and "no peak" in v["mfu_note"]
    assert gc.mfu_floor("NVIDIA A100-SXM4-80GB") == 0.03
    assert gc.mfu_floor("NVIDIA L4") == 0.04 and gc.mfu_floor("Some Future GPU") == 0.02


def test_peak_memory_is_the_last_json_line():
    out = 'log line\n{"not": "it"}\nmore\n{"peak_gpu_bytes": 123}\n'
    assert gc.last_json(out) == {"peak_gpu_bytes": 123}
    assert gc.last_json("no json here") is None


def test_losses_are_checked_against_naive_at_each_shape():
    result = {"results": [
        dict(shape="s", impl="naive", loss=100.0), dict(shape="s", impl="ssr-triton", loss=100.5),
        dict(shape="s", impl="liger", loss=103.0),
    ]}  # fmt: skip
    checks = {c["impl"]: c["ok"] for c in gc.check_losses(result)}
    assert checks == {"ssr-triton": True, "liger": False}


def test_the_checkpoint_to_reload_is_the_latest(tmp_path):
    for n in (2, 10, 9):
        (tmp_path / "checkpoints" / f"step-{n}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-11.tmp").mkdir()
    assert gc.latest_checkpoint(tmp_path).name == "step-10"
    assert gc.latest_checkpoint(tmp_path / "none") is None


# -------------------------------------------------------------------------------- summary
def test_the_summary_table_says_what_ran_and_what_failed():
    report = dict(
        device=H100, quick=True, ok=False, seconds=401.2,
        steps=dict(
            pytest_gpu=dict(ok=False, seconds=120.0, passed=30, failed=0,
                            problems=["required test skipped: t::flash (no flash_attn)"],
                            not_run=["tests/test_backends_gpu.py (SGLang)"]),
            cross_entropy=dict(ok=True, seconds=50.0, loss_check=[dict(impl="x", shape="s", ok=True)]),
            ssr_run=dict(ok=True, seconds=140.0, steps=12, loss_falls=True, mfu_median=0.123,
                         mfu_floor=0.02, tokens_per_s_median=51234.0, peak_gpu_bytes=3 * 2**30),
            reload=dict(ok=True, seconds=20.0, checkpoint="step-12"),
        ),
    )  # fmt: skip
    table = gc.summary_table(report)
    assert table.startswith(f"make gpu-check (quick) on {H100}: FAIL in 401.2 s")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}  # fmt: skip
    assert "**FAIL**" in rows["pytest -m gpu"] and "required test skipped" in rows["pytest -m gpu"]
    assert "not run (optional): 1" in rows["pytest -m gpu"]
    ssr = rows["SSR run (bf16, FA2, Triton loss)"]
    assert "pass" in ssr and "51234 tokens/s" in ssr and "MFU 0.123" in ssr and "3.00 GiB" in ssr
    assert "step-12" in rows["checkpoint reload"]


def test_without_a_gpu_the_check_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out",
         str(tmp_path / "x.json")],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stdout
