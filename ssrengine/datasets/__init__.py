"""Datasets: the embedded content-grounded QA generator and converters from public formats.

- `ssrengine.datasets.builtin` — a seeded generator of short documents + questions (about 30%
  unanswerable) with terse annotator-style gold answers; ``builtin:SPLIT`` in configs.
- `ssrengine.datasets.loaders` — MultiDoc2Dial, Natural Questions (simplified) and MuSiQue into
  the record format of DESIGN.md.
- ``python -m ssrengine.datasets`` — write either as JSONL.
"""
