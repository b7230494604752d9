"""Reading a run configuration: TOML files, `--section.field=value` overrides and saved
config.json files become a `Config`; `validate` is the one place values are judged (types,
choices, ranges, cross-field rules), and every error names the key and where it came from.
`markdown_table` renders the schema for docs/configuration.md."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import operator
import re
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ssrengine.core.config import SECTIONS, Config
from ssrengine.core.config_paths import resolve_relative_paths
from ssrengine.core.errors import InputError
from ssrengine.core.io import read_json, read_text

log = logging.getLogger(__name__)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _field_type(cls: type, name: str) -> tuple[type, tuple[Any, ...] | None]:
    """The field's value type and its allowed values (a ``Literal`` annotation or ``choices``)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a list of names
        return tuple, _field(cls, name).metadata["choices"]
    return hint, _field(cls, name).metadata["choices"]


_BOOL_TEXT = ("true", "false", "1", "0", "yes", "no")


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Parse a command-line string into the field's type; `validate` checks the result."""
    want, _ = _field_type(cls, name)
    if _field(cls, name).metadata.get("json_object") and isinstance(value, dict):
        return json.dumps(value, sort_keys=True)  # a TOML table: kept as its JSON text
    if want is tuple:  # a TOML list, or "a,b" on the command line
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return tuple(value) if isinstance(value, list) else value
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if want is bool:
                if text.lower() not in _BOOL_TEXT:
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = want(text)
        except ValueError:
            raise InputError(f"expected {want.__name__}, got {value!r}", file=where) from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


_BOUNDS = {
    "ge": (">=", operator.ge),
    "gt": (">", operator.gt),
    "le": ("<=", operator.le),
    "lt": ("<", operator.lt),
}


def range_text(f: dataclasses.Field) -> str:
    """A field's numeric range as the docs and errors state it (``>= 0 and < 1``), or ''."""
    parts = [f"{_BOUNDS[k][0]} {f.metadata[k]:g}" for k in _BOUNDS if f.metadata.get(k) is not None]
    return " and ".join(parts)


def _problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with one field's value (type, choice, finiteness, range), or None."""
    f = _field(cls, name)
    want, choices = _field_type(cls, name)
    numeric = want in (int, float)
    if not isinstance(value, want) or (numeric and isinstance(value, bool)):
        return f"expected {want.__name__}, got {value!r}"
    if want is tuple:
        bad = [v for v in value if not isinstance(v, str) or (choices and v not in choices)]
        if bad:
            return f"each must be one of {', '.join(map(repr, choices or ()))}, got {bad[0]!r}"
        return None
    if choices and value not in choices:
        return f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
    if want is float and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    bounds = [
        (op, f.metadata[k]) for k, (_, op) in _BOUNDS.items() if f.metadata.get(k) is not None
    ]
    if numeric and not all(op(value, bound) for op, bound in bounds):
        return f"must be {range_text(f)}, got {value!r}"
    if f.metadata.get("nonempty") and not value.strip():
        return "must not be empty"
    pattern = f.metadata.get("pattern")
    if pattern and not re.fullmatch(pattern, value):
        return f"got {value!r}, expected a value matching {pattern}"
    if f.metadata.get("json_object"):
        return _json_object_problem(value)
    return None


def _json_object_problem(text: str) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"expected a TOML table or a JSON object, got {text!r} ({e.msg})"
    return None if isinstance(value, dict) else f"expected a JSON object, got {text!r}"


# Keys that say one thing two ways: given both (the first above 0), one would be ignored.
EITHER_OR = (("train.max_steps", "train.epochs"), ("train.warmup_steps", "train.warmup_ratio"))


def _either_or(raw: dict[str, Any], cfg: Config, origins: dict[str, str], source: str) -> None:
    """One line when the user gave both keys of an `EITHER_OR` pair with effect."""
    for a, b in EITHER_OR:
        given = [k for k in (a, b) if k.partition(".")[2] in raw.get(k.partition(".")[0], {})]
        values = [getattr(getattr(cfg, k.partition(".")[0]), k.partition(".")[2]) for k in (a, b)]
        if len(given) == 2 and values[0] > 0 and values[1] > 0:
            where = sorted({origins.get(k, source) for k in given})
            raise InputError(
                f"{a} = {values[0]:g} and {b} = {values[1]:g} are both given and say the same "
                f"thing two ways: keep one ({a} = 0 leaves it to {b})",
                file=" + ".join(where),
            )


def validate(
    cfg: Config, *, source: str = "<config>", origins: dict[str, str] | None = None
) -> None:
    """Every field's type, choices and range, then the checks that span fields. ``origins``
    maps ``section.key`` to where its value came from (the file or the command line)."""
    origins = origins or {}
    for sec, cls in SECTIONS.items():
        section = getattr(cfg, sec)
        for f in dataclasses.fields(cls):
            problem = _problem(cls, f.name, getattr(section, f.name))
            if problem:
                key = f"{sec}.{f.name}"
                raise InputError(problem, file=f"{origins.get(key, source)}: {key}")
    for problem in _cross_field_problems(cfg):
        raise InputError(problem, file=source)


def _cross_field_problems(cfg: Config) -> list[str]:
    g, j, t = cfg.generation, cfg.judge, cfg.train
    out = []
    if t.packing and t.max_tokens < cfg.data.max_seq_len:
        out.append(
            f"train.max_tokens={t.max_tokens} is smaller than data.max_seq_len="
            f"{cfg.data.max_seq_len}: a packed bin must hold the longest example"
        )
    if cfg.data.eval_file and cfg.data.eval_fraction:
        out.append("set data.eval_file or data.eval_fraction, not both")
    if t.keep_best and not (cfg.data.eval_file or cfg.data.eval_fraction):
        out.append("train.keep_best needs validation data: data.eval_file or data.eval_fraction")
    if g.num_samples > 1 and g.temperature <= 0:
        out.append(
            f"generation.num_samples={g.num_samples} needs generation.temperature > 0: greedy "
            "decoding gives the same answer every time"
        )
    http = ("sglang-http", "openai")
    if g.backend in http and not g.url and not (g.backend == "sglang-http" and g.launch):
        out.append(f"generation.backend = {g.backend!r} needs generation.url (a server URL)")
    judge_backend = j.backend or g.backend
    launched = judge_backend == "sglang-http" and g.launch
    if j.kind == "llm" and judge_backend in http and not (j.url or g.url) and not launched:
        out.append(f"the LLM judge's backend {judge_backend!r} needs judge.url or generation.url")
    return out


def _unknown(kind: str, name: str, known: list[str], where: str) -> InputError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"unknown {kind} '{name}'{hint}; known: {', '.join(known)}", file=where)


def build_config(
    raw: dict[str, Any],
    *,
    source: str = "<config>",
    origins: dict[str, str] | None = None,
    check: bool = True,
    either_or: bool = True,
) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys; ``check``: `validate`
    and (``either_or``: ``raw`` holds only keys the user gave) no `EITHER_OR` pair given twice."""
    sections: dict[str, Any] = {}
    for sec, values in raw.items():
        if sec not in SECTIONS:
            raise _unknown("config section", sec, list(SECTIONS), source)
        if not isinstance(values, dict):
            raise InputError(f"section [{sec}] must be a table", file=source)
        cls = SECTIONS[sec]
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise _unknown(f"key in [{sec}]", key, known, source)
            where = (origins or {}).get(f"{sec}.{key}", source)
            kwargs[key] = _coerce(cls, key, value, f"{where}: {sec}.{key}")
        sections[sec] = cls(**kwargs)
    cfg = Config(**sections)
    if check:
        validate(cfg, source=source, origins=origins)
        if either_or:
            _either_or(raw, cfg, origins or {}, source)
    return cfg


def _is_bool_key(key: str) -> bool:
    sec, _, name = key.partition(".")
    cls = SECTIONS.get(sec)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return False
    return _field_type(cls, name)[0] is bool


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """``--section.field=value`` (or ``--section.field value``) → nested dict of strings.

    A boolean key may stand alone: ``--train.lora`` is true, ``--no-train.lora`` false; a bare
    boolean takes the next argument as its value only when that reads as a boolean."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise InputError(f"expected --section.field=value, got {arg!r}", file="<command line>")
        key, sep, value = arg[2:].partition("=")
        negated = key.startswith("no-") and _is_bool_key(key[3:].replace("-", "_"))
        if negated:
            if sep:
                raise InputError(f"--{key} takes no value, got {arg!r}", file="<command line>")
            key, value = key[3:], "false"
        elif not sep:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if _is_bool_key(key.replace("-", "_")):
                if nxt is not None and nxt.strip().lower() in _BOOL_TEXT:
                    value, i = nxt, i + 1
                else:
                    value = "true"
            elif nxt is None:
                raise InputError(f"missing value for --{key}", file="<command line>")
            else:
                value, i = nxt, i + 1
        sec, _, name = key.partition(".")
        out.setdefault(sec, {})[name.replace("-", "_")] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read TOML (optional), apply ``--section.field=value`` overrides, validate everything."""
    raw: dict[str, dict[str, Any]] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise InputError("config file not found", file=source)
        try:
            raw = tomllib.loads(read_text(p))
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"invalid TOML: {e}", file=source) from None
        raw = resolve_relative_paths(raw, p)  # from the file's folder (core.config_paths)
    build_config(raw, source=source, check=False)  # unknown keys and types against the file
    origins = {f"{sec}.{key}": source for sec, values in raw.items() for key in values}
    cli = parse_overrides(overrides or [])
    for sec, values in cli.items():
        raw.setdefault(sec, {}).update(values)
        origins.update({f"{sec}.{key}": "<command line>" for key in values})
    where = source if not overrides else f"{source} + command line"
    return build_config(raw, source=where, origins=origins)


# Settings that run or load code. A run directory is data: someone else's run on shared
# storage must not run their program when you evaluate or export it, so these come only from
# your own config file or command line (`saved_config` drops them from a saved config.json).
# Each is dropped with one warning and the command goes on without it: an eval or export needs
# none of them (trust_remote_code: a model that needs its own code then fails to load, naming
# the key; launch_python: a launched server uses this interpreter; a python: judge: eval and
# export never judge).
CODE_SETTINGS: dict[str, Callable[[Any], bool]] = {
    "model.trust_remote_code": lambda v: v is not False,  # "true" would parse as true
    "generation.launch_python": lambda v: bool(v),
    "judge.kind": lambda v: isinstance(v, str) and v.startswith("python:"),
    "train.callbacks": lambda v: bool(v),
}


def drop_code_settings(raw: dict[str, Any], source: str, *, warn: bool = True) -> dict[str, Any]:
    """``raw`` (a saved config's sections) without the `CODE_SETTINGS` it asks for, each named
    in one warning (``warn``); the defaults take their place."""
    out = {sec: dict(v) if isinstance(v, dict) else v for sec, v in raw.items()}
    for key, runs_code in CODE_SETTINGS.items():
        sec, _, name = key.partition(".")
        values = out.get(sec)
        if isinstance(values, dict) and name in values and runs_code(values[name]):
            value = values.pop(name)
            if not warn:
                continue
            log.warning(
                "%s: ignoring %s = %s: settings that run code are taken only from your own "
                "config file or command line, never from a run directory (pass --%s=... to "
                "use it)",
                source,
                key,
                json.dumps(value),
                key,
            )
    return out


def saved_config(
    path: str | Path, overrides: list[str] | None = None, *, warn: bool = True
) -> Config:
    """A run directory's saved config.json, without its `CODE_SETTINGS` (each named in a
    warning: ``warn``), with the user's own ``--section.field=value`` overrides on top; a
    damaged file is an InputError naming it."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise InputError("expected a JSON object of config sections", file=str(path))
    raw = drop_code_settings(raw, str(path), warn=warn)
    origins: dict[str, str] = {}
    for sec, values in parse_overrides(overrides or []).items():
        if not isinstance(raw.setdefault(sec, {}), dict):
            break  # build_config names the damaged section
        raw[sec].update(values)
        origins.update({f"{sec}.{key}": "<command line>" for key in values})
    # A saved config holds every key: both of each EITHER_OR pair, as the run resolved them.
    return build_config(raw, source=str(path), origins=origins, either_or=False)


def config_from_json(path: str | Path, *, warn: bool = True) -> Config:
    """A run directory's saved config.json (`saved_config` without overrides)."""
    return saved_config(path, warn=warn)


def markdown_table() -> str:
    """docs/configuration.md's reference, generated from the dataclasses."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = json.dumps(f.default)
            doc = f.metadata["doc"]
            _, choices = _field_type(cls, f.name)
            if choices:
                doc += " One of: " + ", ".join(f"`{c}`" for c in choices if c) + "."
            if range_text(f):
                doc += f" Range: {range_text(f)}."
            if f.metadata.get("nonempty"):
                doc += " Must not be empty."
            if f.metadata.get("pattern"):
                escaped = f.metadata["pattern"].replace("|", "\\|")  # a bare | ends the cell
                doc += f" Format: `{escaped}`."
            lines.append(f"| `{sec}.{f.name}` | `{default}` | {doc} |")
    return "\n".join(lines)
