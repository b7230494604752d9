"""Credentials in URLs (``http://user:secret@host``) never leave the process: every URL that is
saved (config.json, a checkpoint's run_config.json, eval.json), logged or put in an error line
goes through `redact` first. The request itself still sends them (HTTP Basic authentication).
"""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ : the userinfo (user or user:password) of every URL in a text, URLs in a
# comma-separated list included. A userinfo cannot hold '/', '@' or whitespace unescaped.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/@\s,]+)@")
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def redact_values(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, strings) with `redact` applied to every string."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_values(v) for v in obj)
    return obj
