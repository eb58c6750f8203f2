"""The type checker of config fields: every value, whether it came from YAML, flags or Python, is
converted to its field's declared type (ints become floats where a float is wanted) or refused in one line."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal

from tyro.constructors import PrimitiveConstructorSpec

from cmalign.errors import UserError


def name_value_pairs(kind):
    """Command-line form of a {name: value} field: `--reward-weights proxy=1.0 classifier=0.5`."""

    def parse(args: list[str]) -> dict:
        out = {}
        for item in args:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ValueError(f"expected NAME=VALUE, got {item!r}")
            out[name] = kind(value)
        return out

    return PrimitiveConstructorSpec(
        nargs="*", metavar="NAME=VALUE", instance_from_str=parse, is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda d: [f"{k}={v}" for k, v in d.items()],
    )


@functools.cache
def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp):
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _is_union(origin) -> bool:
    return origin is typing.Union or origin is types.UnionType


def describe(tp) -> str:
    """A type as the error message names it: "an integer", "kl | js", "a number or null", ..."""
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if _is_union(origin):
        return " or ".join(describe(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict:
        return f"a mapping of name: {describe(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert_union(value, args):
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is not type(None):
            try:
                return convert(value, a)
            except ValueError:
                pass
    raise ValueError


_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def convert(value, tp):
    """value as type tp, or ValueError."""
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if _is_union(origin):
        return _convert_union(value, args)
    if origin in (list, dict):
        if not isinstance(value, (list, tuple) if origin is list else dict):
            raise ValueError
        if origin is list:
            return [convert(v, args[0]) for v in value]
        return {convert(k, args[0]): convert(v, args[1]) for k, v in value.items()}
    if tp in _SCALARS:
        if _SCALARS[tp](value):
            return float(value) if tp is float else value
        raise ValueError
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        raise ValueError
    return value


def checked(cls, name: str, value, where: str):
    """cls's field `name` set to value, converted, or one UserError line naming the field and its type."""
    try:
        return convert(value, hints(cls)[name])
    except ValueError:
        raise UserError(f"{where}{name} must be {describe(hints(cls)[name])}, got {value!r}") from None


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats(v)


def check_fields(obj, cls, where: str = "", skip=()) -> None:
    """Every field of a dataclass instance has its declared type and every number in it is finite."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        checked(cls, f.name, value, where)
        if any(not math.isfinite(x) for x in _floats(value)):
            raise UserError(f"{where}{f.name} must be finite, got {value!r}")
