"""Build configuration.

`kernels/` is installed as `ssrengine.kernels`; ssrengine/kernels/__init__.py explains how (and
why kernels/ has no __init__.py). The native packer in kernels/csrc is an optional extension,
`ssrengine.kernels._packer`, built by the top-level CMakeLists.txt: when cmake, a C++17
compiler, the Python headers or pybind11 is missing, or the build fails, the install prints a
warning and still succeeds, and ssrengine.models.packing uses its pure-Python planner (same bins).
Set SSRENGINE_NO_NATIVE=1 to skip the native build on purpose.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

packages = sorted(set(find_packages(include=["ssrengine", "ssrengine.*"])) | {"ssrengine.kernels"})


class BuildPy(build_py):
    """package_dir maps ssrengine.kernels to kernels/, which has no __init__.py: the package's
    __init__ is ssrengine/kernels/__init__.py, added here beside the kernel modules."""

    def run(self) -> None:
        super().run()
        init = Path(self.build_lib) / "ssrengine" / "kernels" / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(ROOT / "ssrengine" / "kernels" / "__init__.py"), str(init))


class CMakeExtension(Extension):
    """An extension module whose build is entirely CMakeLists.txt's business."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class OptionalCMakeBuild(build_ext):
    """Build each CMakeExtension with cmake; one that cannot be built is dropped with a warning."""

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                self._cmake(ext)
            except Exception as e:  # any failure means "install without it"
                self.warn(
                    f"\n*** optional native extension {ext.name} not built ({e}).\n"
                    "*** ssrengine installs without it and uses the pure-Python packer.\n"
                )
                self.extensions.remove(ext)

    def _cmake(self, ext: Extension) -> None:
        if os.environ.get("SSRENGINE_NO_NATIVE"):
            raise RuntimeError("SSRENGINE_NO_NATIVE is set")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("pybind11 is not installed") from e
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSSR_OUTPUT_DIR={out_dir}",
        ]
        for cmd in (configure, [cmake, "--build", str(build_dir), "--config", "Release"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"`{' '.join(cmd[:2])} ...` failed:\n{tail}")
        if not Path(self.get_ext_fullpath(ext.name)).exists():
            raise RuntimeError(f"cmake did not produce {self.get_ext_fullpath(ext.name)}")


setup(
    packages=packages,
    package_dir={"ssrengine": "ssrengine", "ssrengine.kernels": "kernels"},
    package_data={"ssrengine": ["assets/*.jsonl"]},
    ext_modules=[CMakeExtension("ssrengine.kernels._packer")],
    cmdclass={"build_ext": OptionalCMakeBuild, "build_py": BuildPy},
)
