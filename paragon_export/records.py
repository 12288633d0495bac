"""records: the one way a typed report (a dataclass) becomes the JSON written beside an artifact and
is read back. Fields are written in declaration order, nested dataclasses as their own JSON; a field
made with `optional()` is left out while it is None (reports write an absent figure by leaving its
key out). `from_json` rebuilds nested dataclasses from the field types and ignores keys that are not
fields (constant keys a class adds in its own `to_json`)."""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import field, fields, is_dataclass

_OMIT = "omit_when_none"


def optional():
    """A field whose key the JSON has only when it is not None."""
    return field(default=None, metadata={_OMIT: True})


def to_plain(value):
    """JSON-ready data of `value`: dataclasses as dicts of their fields, lists and dicts item by item."""
    if isinstance(value, Record):
        return value.to_json()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_plain(tp, value):
    """`value` (JSON data) as type `tp`: dataclasses rebuilt, `X | None`, `list[X]` and `dict[str, X]` item
    by item; anything else as it is."""
    if value is None or (isinstance(tp, type) and isinstance(value, tp)):
        return value  # absent, or already built
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return from_plain(inner[0], value) if len(inner) == 1 else value
    if origin is list and args:
        return [from_plain(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: from_plain(args[1], v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value)
    if isinstance(tp, type) and is_dataclass(tp):
        hints = _hints(tp)
        return tp(**{f.name: from_plain(hints[f.name], value[f.name]) for f in fields(tp) if f.init and f.name in value})
    return value


class Record:
    """Base of the report dataclasses: `to_json()` / `from_json()` as the module docstring says."""

    def to_json(self) -> dict:
        return {f.name: to_plain(getattr(self, f.name)) for f in fields(self)
                if not (f.metadata.get(_OMIT) and getattr(self, f.name) is None)}

    @classmethod
    def from_json(cls, d: dict | None):
        if d is None:
            return None
        hints = _hints(cls)
        return cls(**{f.name: from_plain(hints[f.name], d[f.name]) for f in fields(cls) if f.init and f.name in d})
