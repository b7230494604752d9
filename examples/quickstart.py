"""SSR from Python: look at the prompts, run every stage, export the rehearsal set for TRL.

    python examples/quickstart.py                  # SmolLM2-135M-Instruct, 40 builtin examples (CPU: minutes)
    python examples/quickstart.py --model DIR --data FILE.jsonl --run-dir runs/mine --steps 2

Rerunning it resumes: finished stages are skipped, and a run dir trained under other settings
is refused (use a new --run-dir).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ssrengine


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or HF model dir")
    p.add_argument("--data", default="builtin:train", help="training JSONL or builtin:SPLIT")
    p.add_argument("--n", type=int, default=40, help="training examples")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--run-dir", default="runs/quickstart")
    a = p.parse_args(argv)

    # A config is a Config, a TOML file, or a dict of sections like this one.
    config = {
        "model": {"path": a.model},
        "data": {"train_file": a.data, "max_examples": a.n},
        "generation": {"max_new_tokens": a.max_new_tokens},
        "judge": {"kind": "rule", "min_f1": 0.3},
        "train": {"max_steps": a.steps, "lr": 2e-5},
        "run": {"dir": a.run_dir, "mode": "ssr"},
    }
    print(ssrengine.render(config, n=1))  # the exact prompt and the supervised span
    checkpoint = ssrengine.run(config)  # generate → judge → build → train
    out = ssrengine.export(a.run_dir)  # TRL prompt-completion format
    first = json.loads((out / "rehearsal.jsonl").read_text().splitlines()[0])
    print(f"checkpoint: {checkpoint}\nexport:     {out}  (first row source: {first['source']})")
    return out


if __name__ == "__main__":
    main()
