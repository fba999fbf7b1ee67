"""How an answer is compared with what was expected, in the trusted process (pure functions).

- stdin: the whole output and the expected output are stripped and split into lines; lines match when equal
  after stripping, or when both hold the same number of whitespace-separated tokens that are all ASCII
  decimal numbers and are pairwise equal (as Decimals, so "1.0" equals "1"; within `float_tolerance` when it
  is > 0), as LiveCodeBench does (but a fullwidth or Arabic-Indic digit is not a digit here).
- functional: the returned value (tuples read as lists) must equal the JSON-decoded expected output; numbers
  compare within `float_tolerance` when it is > 0.
Values are shown in feedback as JSON where they are JSON, else as Python reprs.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers_close(a: float, b: float, tol: float) -> bool:
    if tol <= 0 or (isinstance(a, int) and isinstance(b, int)):  # ints past float range compare exactly
        return a == b
    try:
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    except OverflowError:  # an int past float range against a float: they cannot be close
        return False


def values_equal(actual: Any, expected: Any, *, float_tolerance: float = 0.0) -> bool:
    """A returned value against a JSON-decoded expected value: tuples count as lists, numbers within tolerance."""
    if isinstance(actual, tuple):
        actual = list(actual)
    if _is_number(actual) and _is_number(expected):
        return _numbers_close(actual, expected, float_tolerance)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(
            values_equal(a, e, float_tolerance=float_tolerance) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            values_equal(actual[k], expected[k], float_tolerance=float_tolerance) for k in expected)
    if type(actual) is not type(expected) and not (_is_number(actual) or _is_number(expected)):
        return False
    return actual == expected


# A number as text: ASCII digits only (Decimal() would also read fullwidth, Arabic-Indic and other Unicode
# digits, and underscores, as the number), an optional sign, fraction and exponent.
_ASCII_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _decimal_tokens(line: str) -> list[Decimal] | None:
    """The line's tokens as Decimals when every one is an ASCII decimal number, else None (NaN and infinities
    only ever match as text)."""
    tokens = line.split()
    if not all(_ASCII_DECIMAL.fullmatch(tok) for tok in tokens):
        return None
    try:
        return [Decimal(tok) for tok in tokens]
    except InvalidOperation:  # (cannot happen for what the pattern admits; kept for safety)
        return None


def stdout_matches(actual: str, expected: str, *, float_tolerance: float = 0.0) -> bool:
    """Stdin-test output rule (see the module docstring)."""
    actual_lines = [line.strip() for line in actual.strip().split("\n")]
    expected_lines = [line.strip() for line in expected.strip().split("\n")]
    if len(actual_lines) != len(expected_lines):
        return False
    for a, e in zip(actual_lines, expected_lines):
        if a == e:
            continue
        a_nums, e_nums = _decimal_tokens(a), _decimal_tokens(e)
        if a_nums is None or e_nums is None or len(a_nums) != len(e_nums) or not a_nums:
            return False
        if float_tolerance > 0:
            ok = all(_numbers_close(float(x), float(y), float_tolerance) for x, y in zip(a_nums, e_nums))
        else:
            ok = all(x == y for x, y in zip(a_nums, e_nums))
        if not ok:
            return False
    return True


def safe_repr(value: Any) -> str:
    """Python's repr of plain data, or a placeholder when it cannot be shown (an int past Python's
    4,300-digit string limit)."""
    try:
        return repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"


def show_value(value: Any) -> str:
    """A returned value as feedback text: JSON where it is JSON, else Python's repr."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return safe_repr(value)
