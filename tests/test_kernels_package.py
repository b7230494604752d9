"""The kernels/ folder is `ssrengine.kernels` and nothing else: a Python process started in the
repository root must not import it as the top-level package `kernels`, a name that belongs to
Hugging Face's kernel hub (imported by vLLM and by transformers). And the kernels need only
torch and Triton."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(
    code: str, *, pythonpath: str = "", no_site: bool = False
) -> subprocess.CompletedProcess:
    """`python -c code` started in the repository root (the root is then first on sys.path);
    `no_site` leaves out site-packages (PYTHONPATH still applies)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    flags = ["-S"] if no_site else []
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_a_regular_kernels_package_elsewhere_wins_in_the_repo_root(tmp_path):
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("HUB = True\n")
    proc = _python("import kernels; print(kernels.__file__)", pythonpath=str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(hub / "__init__.py")


def _is_pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


_PROBE = (
    "import importlib.util as u, sys\n"
    "spec = u.find_spec('kernels')\n"
    "print(spec is None or spec.origin is None)\n"
    "from transformers.utils.import_utils import is_kernels_available\n"
    "print(is_kernels_available())\n"
    "print(any(m.startswith('ssrengine') for m in sys.modules))\n"
)


def _site_packages_without_kernels(farm: Path) -> Path:
    """An install without Hugging Face's `kernels`: every entry of this interpreter's
    site-packages linked into `farm` except the `kernels` package and its dist-info."""
    site = Path(importlib.metadata.distribution("kernels").locate_file("")).resolve()
    farm.mkdir()
    for entry in site.iterdir():
        if entry.name == "kernels" or entry.name.startswith("kernels-"):
            continue
        (farm / entry.name).symlink_to(entry)
    return farm


def test_without_another_kernels_package_ours_is_no_regular_package(tmp_path):
    """At most a namespace portion (no __init__.py runs, nothing is imported from ssrengine),
    which transformers' availability check reports as "not installed". transformers >= 5.25
    requires PyPI's `kernels`, so the situation is built: `python -S` (no site-packages) with
    PYTHONPATH naming a copy of site-packages that lacks it."""
    if _is_pypi_kernels_installed():
        site = str(_site_packages_without_kernels(tmp_path / "site"))
        proc = _python(_PROBE, pythonpath=site, no_site=True)
    else:
        proc = _python(_PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]


@pytest.mark.skipif(
    not _is_pypi_kernels_installed(),
    reason="Hugging Face's kernels is not installed (transformers < 5.25 does not require it)",
)
def test_with_pypi_kernels_installed_the_repo_root_imports_it():
    """Today's install (transformers >= 5.25 brings `kernels`): a process started in the
    repository root imports PyPI's package, not our kernels/ folder, and transformers sees it."""
    site_init = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    code = "import kernels; print(kernels.__file__)\n" + _PROBE
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert Path(lines[0]).resolve() == site_init.resolve()
    assert lines[1:] == ["False", "True", "False"]


def test_ssrengine_kernels_imports_from_the_repo_root_and_elsewhere(tmp_path):
    code = "from ssrengine.kernels import fused_linear_cross_entropy; print('ok')"
    assert _python(code).stdout.strip() == "ok"
    away = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert away.stdout.strip() == "ok", away.stderr


def test_kernels_import_only_torch_triton_and_each_other():
    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
