"""Check tests (trusted assert code calling the program as `candidate`): which ones can have their one call
planned ahead of running them, and what their feedback shows. Pure functions of the test's source.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from types import CodeType
from typing import Any

from sandbox.codec import PlainDataError, encode_value
from sandbox.compare import safe_repr

# Builtins a check test may call besides the program and still have its call planned: they cannot call back
# into the program or change what it sees.
_PURE_BUILTINS = frozenset("abs all any bool dict float frozenset int len list max min round set sorted str sum "
                           "tuple type isinstance".split())


def _unconditionally_evaluated(node: ast.AST, target: ast.AST) -> bool:
    """Whether evaluating ``node`` always evaluates ``target`` (short-circuits and lazy parts excluded)."""
    if node is target:
        return True
    if isinstance(node, ast.BoolOp):
        children: list[ast.AST] = node.values[:1]
    elif isinstance(node, ast.IfExp):
        children = [node.test]
    elif isinstance(node, ast.Compare):
        children = [node.left, node.comparators[0]]
    elif isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.NamedExpr)):
        children = []
    else:
        children = list(ast.iter_child_nodes(node))
    return any(_unconditionally_evaluated(child, target) for child in children)


@functools.lru_cache(maxsize=1 << 14)
def trusted_code(source: str, filename: str) -> CodeType:
    """The compiled code of a problem's trusted test code (a problem is graded many times: compiled once)."""
    return compile(source, filename, "exec")


def _single_assert(test_code: str) -> ast.Assert | None:
    """The test's statement when it is exactly one assert."""
    try:
        tree = ast.parse(test_code)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    return tree.body[0]


@functools.lru_cache(maxsize=1 << 14)
def planned_call_args(test_code: str, names: frozenset[str]) -> list[Any] | None:
    """The arguments of the one call of the program that a check test makes, when they are known before it
    runs: the test is a single assert that always makes exactly one call of the program (``names``), with
    positional literal arguments, and calls nothing else but pure builtins. Else None (the test calls live).
    Cached: the list returned is shared, read it only."""
    statement = _single_assert(test_code)
    if statement is None:
        return None
    calls = [n for n in ast.walk(statement) if isinstance(n, ast.Call)]
    program_calls = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id in names]
    if len(program_calls) != 1:
        return None
    call = program_calls[0]
    if call.keywords or not _unconditionally_evaluated(statement.test, call):
        return None
    if any(c is not call and not (isinstance(c.func, ast.Name) and c.func.id in _PURE_BUILTINS) for c in calls):
        return None
    try:
        args = [ast.literal_eval(arg) for arg in call.args]  # a Starred argument is not a literal: None
        encode_value(args)  # what cannot reach the program (1j) is left to the live call to report
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, PlainDataError):
        return None
    return args


def same_plain_data(a: Any, b: Any) -> bool:
    """Equal as the program receives them (True is not 1, a tuple is not a list)."""
    try:
        return encode_value(a) == encode_value(b)
    except PlainDataError:
        return False


def call_text(name: str, args: Sequence[Any]) -> str:
    return f"{name}({', '.join(safe_repr(a) for a in args)})"


def expected_of_assert(test_code: str, namespace: dict[str, Any]) -> str | None:
    """For `assert candidate(...) == EXPR`, the repr of EXPR evaluated in the trusted test code's namespace."""
    statement = _single_assert(test_code)
    if statement is None:
        return None
    test = statement.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    left, right = test.left, test.comparators[0]

    def is_call(node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate"

    other = right if is_call(left) else left if is_call(right) else None
    if other is None or any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(other)):
        return None
    try:
        return safe_repr(eval(compile(ast.Expression(other), "<expected>", "eval"), namespace))
    except Exception:
        return None
