"""Write datasets as record JSONL.

    python -m ssrengine.data builtin SPLIT [--seed N] --out FILE
    python -m ssrengine.data convert multidoc2dial DIR|FILES... --out FILE [--split train]
    python -m ssrengine.data convert nq simplified-nq-*.jsonl[.gz]... --out FILE
    python -m ssrengine.data convert musique musique_*_v1.0_*.jsonl... --out FILE

MultiDoc2Dial takes the release directory (reads multidoc2dial_doc.json and
multidoc2dial_dial_{split}.json) or the files themselves (the one named *_doc.json is the
document file, every other one a dialogue file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ssrengine.core.errors import InputError
from ssrengine.core.io import atomic_write_jsonl
from ssrengine.data import builtin, loaders


def _md2d(inputs: list[Path], split: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    if len(inputs) == 1 and inputs[0].is_dir():
        doc = inputs[0] / "multidoc2dial_doc.json"
        dials = [inputs[0] / f"multidoc2dial_dial_{split or 'train'}.json"]
    else:
        if split is not None:
            raise InputError("--split selects a file in a directory; with files, name them")
        docs = [p for p in inputs if p.name.endswith("_doc.json")]
        dials = [p for p in inputs if p not in docs]
        if len(docs) != 1 or not dials:
            raise InputError(
                "expected one multidoc2dial_doc.json and at least one dialogue file",
                field="INPUT",
            )
        doc = docs[0]
    out = []
    for dial in dials:
        out += loaders.load_multidoc2dial(
            dial,
            doc,
            distractors=args.distractors or 0,
            passage=args.passage,
            refusal=builtin.GOLD_REFUSAL if args.gold_refusal else None,
            seed=args.seed,
        )
    return out


def convert(fmt: str, inputs: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Records from the inputs of one public format; ids must be unique across inputs."""
    if fmt == "multidoc2dial":
        records = _md2d(inputs, args.split, args)
    else:
        if args.split is not None:
            raise InputError(f"--split applies to multidoc2dial only, not {fmt}")
        records = []
        for path in inputs:
            if fmt == "nq":
                records += loaders.load_nq(path, seed=args.seed)
            else:
                d = 3 if args.distractors is None else args.distractors
                records += loaders.load_musique(path, distractors=d, seed=args.seed)
    seen: set[str] = set()
    for r in records:
        if r["id"] in seen:
            raise InputError(f"duplicate id {r['id']!r} across the inputs", field="id")
        seen.add(r["id"])
    return records


def summary(records: list[dict[str, Any]]) -> str:
    n = len(records)
    ans = sum(r.get("answerable") is not False for r in records)
    multi = sum(len(r["messages"]) > 1 for r in records)
    share = (lambda k: f"{100 * k / n:.1f}%") if n else (lambda k: "n/a")
    return f"{n} examples (answerable {share(ans)}, multi-turn {share(multi)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssrengine.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("builtin", help="the embedded content-grounded QA generator")
    b.add_argument("split", choices=builtin.SPLITS)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("convert", help="a public dataset into records")
    c.add_argument("format", choices=("multidoc2dial", "nq", "musique"))
    c.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--split", help="multidoc2dial directory input: which dialogue file")
    c.add_argument("--seed", type=int, default=0, help="distractor and paragraph choice")
    c.add_argument("--distractors", type=int, help="extra documents (md2d 0, musique 3)")
    c.add_argument(
        "--passage",
        choices=("section", "document"),
        default="section",
        help="multidoc2dial: referenced sections only, or whole documents",
    )
    c.add_argument(
        "--gold-refusal",
        action="store_true",
        help="multidoc2dial: unanswerable turns answer GOLD_REFUSAL",
    )
    args = p.parse_args(argv)
    try:
        if args.cmd == "builtin":
            records = builtin.generate(args.split, args.seed)
        else:
            records = convert(args.format, args.inputs, args)
        atomic_write_jsonl(args.out, records)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary(records)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
