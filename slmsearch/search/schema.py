"""The types a study file's values must have, read from the dataclass fields they fill.

Each section of a study file fills one dataclass (``StudyConfig``, ``SpaceConfig``, ...). Before
any of them is built, every value is checked against its field's annotation, so that a wrong
type is one line naming the key, the value and what is allowed (``space.lora_steps must be an
integer, got 'ten'``) instead of a comparison error deep inside ``__post_init__``. The ranges
are each dataclass's own ``__post_init__`` checks, which then run on values of the right type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from slmsearch.errors import SlmsearchError

_NONE = type(None)


def describe(tp: Any) -> str:
    """What a value of annotation ``tp`` looks like, in words."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [describe(a) for a in args if a is not _NONE]
        return " or ".join(inner) + (" or null" if _NONE in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if len(args) == 2 and args[0] == args[1]:
            return f"a [low, high] pair of {_plural(args[0])}"
        return f"a list of {len(args)} values"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(tp, describe(tp))


def check_value(key: str, value: Any, tp: Any) -> Any:
    """``value`` if it has type ``tp`` (lists become tuples, integers become floats where a float is
    asked for); else a SlmsearchError naming ``key``, the value and what is allowed."""
    if typing.get_origin(tp) is dict and isinstance(value, Mapping):  # name the bad entry, not the mapping
        key_type, value_type = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not _convert(k, key_type)[0]:
                raise SlmsearchError(f"{key} keys must be {_plural(key_type)}, got {k!r}")
            out[k] = check_value(f"{key}.{k}", v, value_type)
        return out
    ok, converted = _convert(value, tp)
    if not ok:
        raise SlmsearchError(f"{key} must be {describe(tp)}, got {value!r}{_text_number_hint(value)}")
    return converted


def _text_number_hint(value: Any) -> str:
    """YAML 1.1 reads ``1e3`` (no dot, no exponent sign) and quoted numbers as text: say so."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if "e" in value.lower():
        return f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. 1.0e+3)"
    return " (text, not a number: drop the quotes)"


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return good, float(value) if good else value
    if tp is str:
        return isinstance(value, str), value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return _NONE in args, None
        for arg in args:
            if arg is not _NONE:
                ok, converted = _convert(value, arg)
                if ok:
                    return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        out = [_convert(v, t) for v, t in zip(value, items)]
        return all(ok for ok, _ in out), tuple(c for _, c in out)
    if origin is dict:
        if not isinstance(value, Mapping):
            return False, value
        keys = [_convert(k, args[0]) for k in value]
        vals = [_convert(v, args[1]) for v in value.values()]
        if not all(ok for ok, _ in keys + vals):
            return False, value
        return True, {k: v for (_, k), (_, v) in zip(keys, vals)}
    return True, value  # nested sections (dataclasses) are checked by their own section


def check_section(section: str, raw: Any, cls: type, *, localns: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A study-file section checked against dataclass ``cls``: a mapping, no unknown key, every
    value of its field's type. Returns the converted values (nested sections left as they are).
    ``section`` prefixes the keys in messages ('' for the top level)."""
    where = f"study section {section!r}" if section else "the study file"
    if not isinstance(raw, Mapping):
        raise SlmsearchError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls, localns=dict(localns or {}))
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise SlmsearchError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(known))}")
        out[key] = check_value(f"{section}.{key}" if section else str(key), value, hints[key])
    return out
