"""Moved to `ssrengine.data`; this package keeps ``python -m ssrengine.datasets`` working."""
