"""Evaluating runs: in-domain metrics, retention of general ability, and reports.

`evaluate` (``python -m ssrengine eval``), `metrics` (task metrics), `retention` (probe and
multiple-choice retention, own-answer scoring), `probe_gen` (the retention probe set),
`stats` (bootstrap intervals, paired differences, AUC) and `report` (tables and plots over
several runs).
"""
