"""``python -m ssrengine.train --config FILE [--section.field=value ...] [--resume]``: every stage
of a run (generate → judge → build → train) into run.dir, skipping finished work."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ssrengine.cli import main as cli_main

    args = sys.argv[1:] if argv is None else argv
    return cli_main(["run", *args], prog="python -m ssrengine.train")


if __name__ == "__main__":
    sys.exit(main())
