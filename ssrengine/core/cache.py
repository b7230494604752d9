"""The user-level cache: converted models (`ssrengine.models.loading`) and the embedded dataset's
splits (`ssrengine.data.builtin`). Standard library only, so the data side finds it without
importing torch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SSRENGINE_CACHE``, else ``~/.cache/ssrengine``."""
    return Path(os.environ.get("SSRENGINE_CACHE", Path.home() / ".cache" / "ssrengine"))
