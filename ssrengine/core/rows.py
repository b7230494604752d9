"""Typed rows: every file of a run directory holds frozen dataclasses with ``to_json()`` and
``from_json(obj, file, line)``. A row read back that is not an object, lacks a field or has one
of the wrong type is an InputError naming the file, line and field. Resumable rows carry a
``key()``: it covers everything the row depends on, so a changed input gives a new key and the
row is recomputed, never reused."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from ssrengine.core.errors import InputError
from ssrengine.core.io import read_rows


def content_hash(obj: Any) -> str:
    """A short stable hash of JSON-able ``obj``: the part of a resume key that covers inputs."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ shape checking
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field annotation (str, bool, int, float, X | None, list[X],
    dict[str, X], Any). JSON has no int/bool distinction we want: true is not a number."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(v, item) for v in value.values())
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def json_object(obj: Any, file: str, line: int | None, at: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(
            f"expected a JSON object, got {type(obj).__name__}",
            file=file,
            line=line,
            field=at.rstrip(".") or None,
        )
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _null_as_nan(value: Any, tp: Any, *, anything: bool = False) -> Any:
    """``value`` with JSON null read back as NaN wherever ``tp`` wants a float (a file written
    with `ssrengine.core.io.finite_or_null`: null = undefined). ``anything``: every null leaf."""
    if value is None:
        return math.nan if tp is float or anything else None
    if anything:
        if isinstance(value, dict):
            return {k: _null_as_nan(v, Any, anything=True) for k, v in value.items()}
        if isinstance(value, list):
            return [_null_as_nan(v, Any, anything=True) for v in value]
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        shaped = [a for a in arms if isinstance(value, typing.get_origin(a) or a)]
        return _null_as_nan(value, shaped[0]) if len(shaped) == 1 else value
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(tp)
        return {k: _null_as_nan(v, item) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_null_as_nan(v, item) for v in value]
    return value


R = TypeVar("R", bound="Row")


class Row:
    """JSON <-> frozen dataclass whose field names are the JSON keys; ``from_json`` checks shape.

    Fields with a default may be absent from the JSON; ``None``-valued optional fields are left
    out of ``to_json`` so rows read the same as before they were typed."""

    _OMIT_NONE: tuple[str, ...] = ()
    # Rows of files written with null for an undefined number (eval/): null reads back as NaN
    # where a float is wanted, and anywhere inside the `_NULL_AS_NAN_ANY` fields.
    _NULL_AS_NAN = False
    _NULL_AS_NAN_ANY: tuple[str, ...] = ()

    @classmethod
    def from_json(cls: type[R], obj: Any, file: str, line: int | None = None, *, at: str = "") -> R:
        """``at`` prefixes field names in errors when the row is nested in another."""
        obj = json_object(obj, file, line, at)
        hints, values = _hints(cls), {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name, tp = f.name, hints[f.name]
            if name not in obj:
                if f.default is not dataclasses.MISSING:
                    continue
                raise InputError("missing", file=file, line=line, field=at + name)
            v = obj[name]
            if cls._NULL_AS_NAN:
                v = _null_as_nan(v, tp, anything=name in cls._NULL_AS_NAN_ANY)
            if isinstance(tp, type) and issubclass(tp, Row):
                values[name] = tp.from_json(v, file, line, at=f"{at}{name}.")
                continue
            if typing.get_origin(tp) is list and _is_row(typing.get_args(tp)[0]):
                item = typing.get_args(tp)[0]
                if not isinstance(v, list):
                    raise InputError("expected a list", file=file, line=line, field=at + name)
                values[name] = [
                    item.from_json(x, file, line, at=f"{at}{name}[{i}].") for i, x in enumerate(v)
                ]
                continue
            if typing.get_origin(tp) is dict and _is_row(typing.get_args(tp)[1]):
                item = typing.get_args(tp)[1]
                if not isinstance(v, dict):
                    raise InputError("expected an object", file=file, line=line, field=at + name)
                values[name] = {
                    k: item.from_json(x, file, line, at=f"{at}{name}.{k}.") for k, x in v.items()
                }
                continue
            if not _matches(v, tp):
                raise InputError(
                    f"expected {_type_name(tp)}, got {type(v).__name__} {v!r:.40}",
                    file=file,
                    line=line,
                    field=at + name,
                )
            values[name] = v
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name in self._OMIT_NONE and v is None:
                continue
            if isinstance(v, Row):
                v = v.to_json()
            elif isinstance(v, list) and v and all(isinstance(x, Row) for x in v):
                v = [x.to_json() for x in v]
            elif isinstance(v, dict) and v and all(isinstance(x, Row) for x in v.values()):
                v = {k: x.to_json() for k, x in v.items()}
            out[f.name] = v
        return out


def _is_row(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Row)


def read_typed(path: Path, cls: type[R]) -> Iterator[R]:
    """Rows of a run-dir JSONL file as ``cls``, in order (a torn last line is ignored).

    Line numbers count the rows: exact for files the engine wrote (no blank lines)."""
    for lineno, obj in enumerate(read_rows(path), 1):
        try:
            yield cls.from_json(obj, str(path), lineno)
        except InputError as e:
            # A file from another version of the engine, or edited by hand: the stage that
            # writes it recomputes what it needs.
            raise InputError(
                f"{e.message}; delete the file to redo its stage",
                file=e.file,
                line=e.line,
                field=e.field,
            ) from None
