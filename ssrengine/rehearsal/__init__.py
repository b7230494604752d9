"""Building the rehearsal set: the generate, judge and build stages, judges and selection.

`stages` runs generate → judge → build into the run directory; `judge` holds the judges (rule,
LLM, a user's own); `selection` and `prefix_tier` are the pure rules that pick each example's
target (own answer, paraphrase, prefix or gold).
"""
