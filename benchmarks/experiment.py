"""The experiment's bookkeeping (docs/experiment.md): tuning selection and the settings a run
trains with.

    python benchmarks/experiment.py select runs/experiment/tune
    python benchmarks/experiment.py args ssr-balanced runs/experiment/tune/selected.json

`select` reads every tuning run ``ARM-eEPOCHS-lrLR`` (its eval scored builtin:validation only)
and picks, per arm, the epochs and learning rate with the best in-domain score; ties go to fewer
epochs, then the smaller learning rate (the cheaper, gentler setting). It writes selected.json
and selection.md beside the runs. `args` prints the chosen settings of a run's arm as training
flags: runs named ``sft*`` use the SFT arm's, every other run the SSR arm's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TUNE_NAME = re.compile(r"^(?P<arm>[a-z]+)-e(?P<epochs>\d+)-lr(?P<lr>[0-9.e+-]+)$")


def tuning_results(tune_dir: Path) -> list[dict[str, Any]]:
    """One row per evaluated tuning run: arm, epochs, lr, validation score."""
    rows = []
    for ev in sorted(tune_dir.glob("*/eval/eval.json")):
        m = TUNE_NAME.match(ev.parents[1].name)
        if m is None:
            continue
        split = json.loads(ev.read_text())["splits"]["in_domain"]
        if not split.get("data", "builtin:validation").endswith("validation"):
            raise SystemExit(f"{ev}: tuning must score builtin:validation, not {split['data']}")
        rows.append(
            {
                "arm": m["arm"],
                "epochs": int(m["epochs"]),
                "lr": float(m["lr"]),
                "lr_text": m["lr"],
                "score": split["score"],
            }
        )
    return rows


def select(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm the best validation score; ties: fewer epochs, then the smaller lr."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["arm"], -r["score"], r["epochs"], r["lr"])):
        best.setdefault(r["arm"], r)
    return best


def selection_markdown(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| arm | epochs | lr | validation score | chosen |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arm"], r["epochs"], r["lr"])):
        chosen = "**yes**" if best[r["arm"]] is r else ""
        lines.append(
            f"| {r['arm']} | {r['epochs']} | {r['lr_text']} | {r['score']:.1f} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def cmd_select(tune_dir: Path) -> int:
    rows = tuning_results(tune_dir)
    if not rows:
        print(f"error: no evaluated tuning run in {tune_dir}", file=sys.stderr)
        return 2
    best = select(rows)
    out = {
        "split": "builtin:validation",
        "arms": {
            a: {"epochs": r["epochs"], "lr": r["lr_text"], "score": r["score"]}
            for a, r in best.items()
        },
        "runs": rows,
    }
    (tune_dir / "selected.json").write_text(json.dumps(out, indent=2) + "\n")
    (tune_dir / "selection.md").write_text(selection_markdown(rows, best))
    for a, r in best.items():
        print(f"{a}: epochs {r['epochs']}, lr {r['lr_text']} (validation score {r['score']:.1f})")
    return 0


def arm_of(run: str) -> str:
    return "sft" if run.startswith("sft") else "ssr"


def cmd_args(run: str, selected: Path) -> int:
    arms = json.loads(selected.read_text())["arms"]
    arm = arms.get(arm_of(run))
    if arm is None:
        print(f"error: {selected} has no {arm_of(run)!r} arm", file=sys.stderr)
        return 2
    print(f"--train.epochs={arm['epochs']} --train.lr={arm['lr']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("select", help="pick each arm's epochs and lr on validation")
    s.add_argument("tune_dir", type=Path)
    a = sub.add_parser("args", help="the training flags of a run's arm")
    a.add_argument("run")
    a.add_argument("selected", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "select":
        return cmd_select(args.tune_dir)
    return cmd_args(args.run, args.selected)


if __name__ == "__main__":
    sys.exit(main())
