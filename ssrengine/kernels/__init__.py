"""`ssrengine.kernels`: the custom kernels, whose sources live in the repository's top-level
kernels/ folder; they depend only on torch and Triton.

How that folder becomes this package (the one place that explains it):
- kernels/ has no __init__.py on purpose. A Python process started in the repository root
  has the root first on sys.path; a regular package there named `kernels` would shadow the
  unrelated PyPI package `kernels` (Hugging Face's kernel hub, imported by vLLM and by
  transformers). Without __init__.py the folder is at most a namespace portion, which any
  installed regular package beats and which transformers treats as "not installed".
- This file is the package's __init__. In a checkout or an editable install the modules are
  found through `__path__`, extended below to the top-level folder; in a wheel, setup.py
  installs kernels/*.py here (package_dir {"ssrengine.kernels": "kernels"}) beside this file.
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "cross_entropy.py").exists():  # a checkout: modules in kernels/
    __path__.append(str(_Path(__file__).resolve().parents[2] / "kernels"))

from .cross_entropy import (
    IGNORE_INDEX,
    KernelInputError,
    LossWithLSE,
    SequenceScores,
    fused_linear_cross_entropy,
    sequence_log_likelihood,
)

__all__ = [
    "IGNORE_INDEX",
    "KernelInputError",
    "LossWithLSE",
    "SequenceScores",
    "fused_linear_cross_entropy",
    "sequence_log_likelihood",
]
