"""Command line: ``python -m ssrengine {run,generate,judge,build,train,eval,report,render,export,config} ...``.

Commands that run from a config take ``--config FILE`` and ``--section.field=value`` overrides;
``export`` and ``report`` read run directories. Bad input
exits with status 2 and one line naming the file, line and field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ssrengine import rundir
from ssrengine.config import load_config, markdown_table
from ssrengine.diskfull import disk_full_error
from ssrengine.errors import InputError
from ssrengine.generation import BackendError
from ssrengine.runlock import lock_run_dir

COMMANDS = {
    "run": "all stages in order into run.dir (same as python -m ssrengine.train)",
    "generate": f"the base model answers every training prompt -> {rundir.GENERATIONS}",
    "judge": f"the judge marks acceptable answers -> {rundir.VERDICTS}",
    "build": f"accepted own answers + gold for the rest -> {rundir.REHEARSAL}",
    "train": f"fine-tune on {rundir.REHEARSAL} -> {rundir.CHECKPOINTS}/, {rundir.METRICS}",
    "eval": f"task metrics + retention of a run or a model -> OUT/{rundir.EVAL}/eval.json",
    "report": "one table and plots across evaluated runs -> markdown/HTML report",
    "render": "print the first --n training prompts as the model sees them, target marked",
    "export": f"a run's {rundir.REHEARSAL} for another trainer (--format trl) -> RUN/export/",
    "config": "print the resolved config (or --markdown: the key reference)",
}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; eval's and report's own arguments are added only when ``command`` is that
    command, so other commands never import them (eval imports torch and transformers)."""
    p = argparse.ArgumentParser(
        prog="python -m ssrengine", description="Selective Self-Rehearsal fine-tuning."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        if name == "report":
            if command == "report":
                from ssrengine.report import add_arguments

                add_arguments(s)
            continue
        if name == "export":
            from ssrengine.export import FORMATS

            s.add_argument("run", help="run directory")
            s.add_argument("--format", choices=FORMATS, default="trl")
            s.add_argument("--out", help="output directory (default RUN/export/FORMAT)")
            continue
        s.add_argument("--config", help="TOML run config (e.g. configs/demo.toml)")
        if name == "eval" and command == "eval":
            from ssrengine.evaluate import add_arguments

            add_arguments(s)
        if name in ("run", "train"):
            s.add_argument(
                "--resume",
                action="store_true",
                help="continue from the newest checkpoint (error if none)",
            )
        if name == "render":
            s.add_argument("--n", type=int, default=3, help="how many records (default 3)")
            s.add_argument(
                "--tokens", action="store_true", help="one text(label) per token instead of text"
            )
        if name == "config":
            s.add_argument(
                "--markdown", action="store_true", help="print the config key reference table"
            )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = _parser(argv[0] if argv else None).parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_dir = "."
    try:
        if args.command == "config" and args.markdown:
            print(markdown_table())
            return 0
        if args.command in ("report", "export"):
            if overrides:
                raise InputError(
                    f"unexpected arguments: {' '.join(overrides)}", file="<command line>"
                )
            if args.command == "export":
                from ssrengine.export import export

                print(export(args.run, args.format, args.out))
                return 0
            from ssrengine.report import main as report_main

            return report_main(args)
        if args.command == "eval":
            from ssrengine.evaluate import main as eval_main

            return eval_main(args, overrides)
        cfg = load_config(args.config, overrides)
        if args.command == "config":
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.command == "render":
            from ssrengine.render import render

            print(render(cfg, args.n, tokens=args.tokens, color=sys.stdout.isatty()))
            return 0
        from ssrengine.pipeline import run_all, run_stage

        run_dir = cfg.run.dir
        with lock_run_dir(run_dir):
            if args.command == "run":
                run_all(cfg, resume=args.resume)
            else:
                run_stage(cfg, args.command, resume=getattr(args, "resume", False))
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BackendError as e:
        print(f"error: generation backend failed: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BaseException as e:  # torch's CheckpointException is a BaseException
        full = disk_full_error(e, run_dir)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
