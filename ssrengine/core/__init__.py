"""The ground floor: errors, file I/O, the cache, configuration and the run directory.

Standard library only (no torch): `errors` (one-line input errors), `io` (atomic writes, JSONL),
`cache` (where converted models and builtin splits live), `config` (typed sections, TOML and
overrides), `rundir` (every run-directory path and row type), `runlock` (one process per run
directory) and `diskfull` (a full disk as one clear line).
"""
