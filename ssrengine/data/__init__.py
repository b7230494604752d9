"""Training data in: the record format, data files, the embedded dataset and public loaders.

`records` (record format, prompt rendering, tokenization with labels) builds on `files` (JSONL,
JSON, CSV, parquet, Arrow and dataset directories as rows); `builtin` (the embedded seeded
content-grounded QA generator, ``builtin:SPLIT``) and `loaders` (MultiDoc2Dial, Natural
Questions, MuSiQue) build on it. ``python -m ssrengine.data`` writes either as JSONL. No torch.
"""
