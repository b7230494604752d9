"""Command line: ``python -m ssrengine COMMAND ...`` (``--help`` lists the commands).

Commands that run from a config take ``--config FILE`` and ``--section.field=value`` overrides;
``export`` and ``report`` read run directories. Bad input
exits with status 2 and one line naming the file, line and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import signal
import sys
import typing

from ssrengine.core import rundir
from ssrengine.core.config import SECTIONS, Config
from ssrengine.core.config_load import load_config, markdown_table
from ssrengine.core.diskfull import disk_full_error
from ssrengine.core.errors import InputError
from ssrengine.core.runlock import lock_run_dir
from ssrengine.generation import BackendError

PROG = "python -m ssrengine"

COMMANDS = {
    "run": "all stages in order into run.dir: generate, judge, build, train",
    "generate": f"the base model answers every training prompt -> {rundir.GENERATIONS}",
    "judge": f"the judge marks acceptable answers -> {rundir.VERDICTS}",
    "build": f"accepted own answers + gold for the rest -> {rundir.REHEARSAL}",
    "train": f"fine-tune on {rundir.REHEARSAL} -> {rundir.CHECKPOINTS}/, {rundir.METRICS}",
    "eval": f"task metrics + retention of a run or a model -> OUT/{rundir.EVAL}/eval.json",
    "report": "one table and plots across evaluated runs -> markdown/HTML report",
    "render": "print the first --n training prompts as the model sees them, target marked",
    "export": f"a run's {rundir.REHEARSAL} for another trainer (--format trl), or a checkpoint "
    "as an HF model (--format hf) -> RUN/export/",
    "config": "print the resolved config (or --markdown: the key reference)",
    "models": "fetch an embedded model into the cache (python -m ssrengine models fetch NAME)",
    "datasets": "write the embedded dataset or convert a public one (python -m ssrengine datasets -h)",
}
# Subcommands that are other modules' command lines, run with the rest of the arguments.
DELEGATED = {"models": "ssrengine.models.fetch", "datasets": "ssrengine.data.__main__"}
# Commands configured by --config FILE and --section.field=value overrides.
CONFIGURED = ("run", "generate", "judge", "build", "train", "eval", "render", "config")

OVERRIDES_HELP = f"""config overrides:
  --section.field=value  set any config key; sections: {", ".join(SECTIONS)}
                         (e.g. --train.max_steps=50 --judge.min_f1=0.5)
  --section.field        a boolean key set to true (--no-section.field: false)

Every key with its default, allowed values and meaning: docs/configuration.md, or
`python -m ssrengine config --markdown`."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and a did-you-mean for a mistyped choice."""

    def error(self, message: str) -> typing.NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            known = re.findall(r"'([^']*)'", m.group(2)) or m.group(2).split(", ")
            message = f"unknown command '{m.group(1)}'{_hint(m.group(1), known)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _hint(word: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _add_arguments(s: argparse.ArgumentParser, name: str, command: str | None) -> None:
    """The arguments of command ``name``; eval's and report's own only when ``command`` is
    that command, so other commands never import them (eval imports torch and transformers)."""
    if name in DELEGATED:
        s.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    if name == "report":
        if command == "report":
            from ssrengine.evaluation.report import add_arguments

            add_arguments(s)
        return
    if name == "export":
        from ssrengine.export import FORMATS

        s.add_argument("run", help="run directory")
        s.add_argument(
            "--format",
            choices=FORMATS,
            default="trl",
            help="trl: the rehearsal set in TRL's prompt-completion format; hf: a checkpoint as "
            "a standalone HF model directory (LoRA: merged)",
        )
        s.add_argument(
            "--checkpoint",
            metavar="step-N|best",
            help="--format hf: which checkpoint (default the newest undamaged one)",
        )
        s.add_argument("--out", help="output directory (default RUN/export/FORMAT)")
        return
    s.add_argument("--config", help="TOML run config (e.g. configs/demo.toml)")
    if name == "eval" and command == "eval":
        from ssrengine.evaluation.evaluate import add_arguments

        add_arguments(s)
    if name in ("run", "generate"):
        s.add_argument(
            "--reuse-generations",
            metavar="OTHER_RUN",
            help="first copy OTHER_RUN's generations made from this model and these prompts "
            "(docs/generation.md)",
        )
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


def _parser_kwargs(name: str) -> dict[str, typing.Any]:
    """Description and epilog of command ``name``: the overrides wherever a config is read."""
    return {
        "description": COMMANDS[name],
        "epilog": OVERRIDES_HELP if name in CONFIGURED else None,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "add_help": name not in DELEGATED,  # the delegated module answers --help itself
    }


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m ssrengine``; see `_add_arguments` for ``command``."""
    p = _Parser(prog=PROG, description="Selective Self-Rehearsal fine-tuning.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        s = sub.add_parser(name, help=COMMANDS[name], **_parser_kwargs(name))
        _add_arguments(s, name, command)
    return p


def command_parser(name: str, prog: str) -> argparse.ArgumentParser:
    """A parser for command ``name`` alone under its own ``prog`` (``python -m ssrengine.train``)."""
    p = _Parser(prog=prog, **_parser_kwargs(name))
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_arguments(p, name, name)
    return p


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ssrengine")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _check_unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """An argument that is neither this command's own option nor --section.field: name it,
    with the closest known option."""
    own = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    keys = [f"--{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or "." in flag:
            continue
        raise InputError(
            f"unknown option {flag}{_hint(flag, own + keys)}; see --help",
            file="<command line>",
        )


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``python -m ssrengine COMMAND ...``; with ``prog``, ``argv`` is the arguments of the
    one command ``argv[0]`` and help and errors name ``prog`` (``python -m ssrengine.train``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    if prog is not None:
        parser = command_parser(argv[0], prog)
        args, overrides = parser.parse_known_args(argv[1:])
        args.command = argv[0]
    else:
        parser = _parser(argv[0] if argv else None)
        args, overrides = parser.parse_known_args(argv)
        parser = _subparser(parser, args.command)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above the progress bars, not through them
        return _run(parser, args, overrides)


def _reuse_generations(cfg: Config, other_run: str) -> None:
    """``--reuse-generations OTHER_RUN`` (`ssrengine.rehearsal.reuse`), before the stages."""
    from ssrengine.pipeline import check_run_config
    from ssrengine.rehearsal.prepare import prepare
    from ssrengine.rehearsal.reuse import reuse_generations

    run_dir = check_run_config(cfg)  # a run dir made under another config is refused first
    reuse_generations(cfg, run_dir, other_run, prepare(cfg))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str]) -> int:
    run_dir = "."
    try:
        _check_unknown_flags(parser, overrides)
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

                print(export(args.run, args.format, args.out, checkpoint=args.checkpoint))
                return 0
            from ssrengine.evaluation.report import main as report_main

            return report_main(args)
        if args.command == "eval":
            from ssrengine.evaluation.evaluate import main as eval_main

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
        from ssrengine.training import distributed

        if args.command in ("run", "train"):
            from ssrengine.training.reporting import check

            check(cfg.train.report_to)  # a missing tracker stops before any stage, not after
        run_dir = cfg.run.dir
        with lock_run_dir(run_dir):
            if getattr(args, "reuse_generations", None):
                _reuse_generations(cfg, args.reuse_generations)
            if args.command == "run":
                run_all(cfg, resume=args.resume)
            else:
                run_stage(cfg, args.command, resume=getattr(args, "resume", False))
        distributed.shutdown()  # success only: on an error the atexit fallback runs
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BackendError as e:
        print(f"error: generation backend failed: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # SIGINT 130, SIGTERM 143
    except BaseException as e:  # torch's CheckpointException is a BaseException
        full = disk_full_error(e, run_dir)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
