"""Values returned by programs: decoding the harness's tagged JSON, comparing with expected values, display.

Runs in the trusted scorer. Nothing here unpickles or evaluates program output: the harness sends tagged JSON
(harness.encode) and `decode` rebuilds plain Python values from it.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
import json
import math
from typing import Any

from sdpo.envs.code import harness


class Unrepresentable:
    """A value the harness could only send as its repr (an arbitrary object); equal only to the same repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unrepresentable) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return self.text


def decode(value: Any) -> Any:
    """A program's value from the harness's tagged JSON (or an expected value from data); what cannot be rebuilt
    is `Unrepresentable`."""
    return harness.decode(value, Unrepresentable)


def values_match(actual: Any, expected: Any, atol: float = 0.0, strict_types: bool = False) -> bool:
    """Equality for test verdicts. Floats compare with a relative tolerance of 1e-7 (or `atol`); NaN equals NaN.

    `strict_types` keeps tuple and list apart (EvalPlus does); otherwise they compare equal (LiveCodeBench's
    expected outputs are JSON, which has no tuples).
    """
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected if strict_types else actual == expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(actual, float) or isinstance(expected, float):
            if math.isnan(actual) and math.isnan(expected):
                return True
            return math.isclose(actual, expected, rel_tol=1e-7, abs_tol=atol)
        return actual == expected
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        if strict_types and type(actual) is not type(expected):
            return False
        return len(actual) == len(expected) and all(
            values_match(a, e, atol, strict_types) for a, e in zip(actual, expected)
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            values_match(actual[k], expected[k], atol, strict_types) for k in actual
        )
    try:
        return bool(actual == expected)
    except Exception:  # noqa: BLE001 - exotic __eq__
        return False


def show(value: Any) -> str:
    """How a value appears in feedback: JSON where it is plain JSON (the data sets' own format), else repr."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)


def stdout_matches(actual: str, expected: str, numeric_tokens: bool = False) -> bool:
    """Line by line after stripping the whole text and each line's trailing whitespace (the data check's rule).

    `numeric_tokens` also accepts a line whose whitespace-separated tokens are equal as decimal numbers ("1.50"
    for "1.5"), as LiveCodeBench's stdin grader does.
    """
    got = [line.rstrip() for line in actual.strip().splitlines()]
    want = [line.rstrip() for line in expected.strip().splitlines()]
    if got == want:
        return True
    return numeric_tokens and len(got) == len(want) and all(_same_numbers(g, w) for g, w in zip(got, want))


def _same_numbers(got: str, want: str) -> bool:
    if got.strip() == want.strip():
        return True
    try:
        return [Decimal(t) for t in got.split()] == [Decimal(t) for t in want.split()]
    except InvalidOperation:
        return False
