"""The one JSON round trip every typed report uses (paragon_export.records)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from paragon_export.records import Record, optional
from paragon_export.verify import Limits


@dataclass
class Leaf(Record):
    name: str
    value: float | None = optional()


@dataclass
class Tree(Record):
    leaves: list[Leaf]
    by_key: dict[str, Leaf]
    limits: dict[str, Limits]  # a plain dataclass (not a Record) nested in a dict
    first: Leaf | None
    note: str | None = None  # written as null, unlike an optional() field
    extra: dict = field(default_factory=dict)


def test_round_trip_keeps_order_omits_unset_optionals_and_rebuilds_nested_types():
    t = Tree([Leaf("a", 1.5), Leaf("b")], {"k": Leaf("c", 2.0)}, {"fp16": Limits(0.01, 50.0)}, None,
             extra={"x": [1, 2]})
    d = t.to_json()
    assert list(d) == ["leaves", "by_key", "limits", "first", "note", "extra"]
    assert d["leaves"] == [{"name": "a", "value": 1.5}, {"name": "b"}]  # an unset optional() key is left out
    assert d["first"] is None and d["note"] is None and d["limits"] == {"fp16": {"max_abs": 0.01, "min_psnr": 50.0}}
    back = Tree.from_json(json.loads(json.dumps(d)))
    assert back == t and isinstance(back.by_key["k"], Leaf) and isinstance(back.limits["fp16"], Limits)
    # keys a class adds itself (constants, schema tags) are not fields and are ignored when read back
    assert Leaf.from_json({"name": "z", "schema": "x"}) == Leaf("z") and Leaf.from_json(None) is None
