"""The hardware model's numbers for 200 seeded random plans equal those captured before the house
was restructured (tests/hwmodel/data/plans200.json, written by capture_plans200.py).

A deliberate change to the hardware model re-captures the fixture in the same commit, so that
the diff of the JSON shows what moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capture_plans200 import OUT, cases, numbers
from slmsearch.compress.plan import Plan

CAPTURED = json.loads(Path(OUT).read_text())


def flat(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a.b.0": leaf}`` for a JSON tree (pytest.approx does not take nested mappings)."""
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, val in enumerate(node) for k, v in flat(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): node}


def test_fixture_matches_the_seeded_cases():
    assert [{k: c[k] for k in ("model", "params", "context_len")} for c in CAPTURED] == cases()


@pytest.mark.parametrize("i", range(200))
def test_hardware_numbers_unchanged(i):
    case = CAPTURED[i]
    now = numbers({k: case[k] for k in ("model", "params", "context_len")})
    now = json.loads(json.dumps(now))
    # the same plan (stage settings added since the capture take their defaults)
    assert Plan.from_dict(now["plan"]) == Plan.from_dict(case["plan"])
    got, want = flat(now["estimate"]), flat(case["estimate"])
    assert got.keys() == want.keys()
    numeric = {k for k, v in want.items() if isinstance(v, float)}
    assert {k: got[k] for k in want.keys() - numeric} == {k: want[k] for k in want.keys() - numeric}
    assert {k: got[k] for k in numeric} == pytest.approx({k: want[k] for k in numeric}, rel=1e-12)
