"""Build configuration.

`kernels/` is installed as `ssrengine.kernels` (a top-level `kernels` module would clash with an
unrelated PyPI package). The native packer in kernels/csrc is an optional extension: see
CMakeLists.txt; without a compiler the install still succeeds and the Python packer is used.
"""

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["ssrengine", "ssrengine.*"])]
packages += ["ssrengine.kernels"] + [
    "ssrengine.kernels." + p for p in find_packages(where="kernels")
]

setup(
    packages=packages,
    package_dir={"ssrengine": "ssrengine", "ssrengine.kernels": "kernels"},
)
