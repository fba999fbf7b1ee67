"""From a model response to the program the sandbox runs.

Code is the content of a closed fenced block tagged ``python``, ``py``, ``python3`` or untagged (blocks tagged
with another language are not Python and are skipped). A fence line inside one of the block's multi-line
string literals does not close it (``x = \'\'\'`` then a fence inside the string): the block ends at the first
closing fence that is not inside a string, else at its first closing fence. Blocks holding only whitespace do
not count. No block → None, which the grader reports as a format error.

With several blocks, the block a grader would run: among the blocks that define the problem's entry point
(a top-level function, or a method of a top-level class, of that name) when there are any, else among the
complete ones (the program they make parses), else among all; ``last`` (LiveCodeBench's choice) takes the
last of them, ``longest`` (the reference code's) the longest. So a prose block, a decoy that does not define
the entry point, or a fragment cut short is not taken over the solution.

HumanEval programs are assembled from the prompt and the extracted code (`assemble_program`):
- the code defines the entry point at top level (a full function): the prompt without the entry point's stub
  (its imports and helpers such as ``poly``), then the code, which may redefine any of them;
- otherwise the code is the body continuing the prompt: prompt + code, the code indented by four spaces when
  its first non-blank line is not indented (a model that writes ``return x`` flush left).
Other sources run the extracted code as it is.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Literal

from sandbox.feedback import FORMAT_ERROR_TEXT, TRUNCATED_TEXT
from sandbox.problems import Problem

CodeBlockMode = Literal["longest", "last"]

_PYTHON_TAGS = {"", "python", "py", "python3"}
# A fence opens on its own line (possibly indented, as in a list item) with an optional language tag, and closes
# on its own line with at least as many backticks.
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})[ \t]*(?P<tag>[^\s`]*)[^\n`]*\n", re.MULTILINE)
_CLOSE = r"^[ \t]*%s`*[ \t]*$"


def _inside_string(code: str) -> bool:
    """Whether ``code`` ends inside a multi-line string literal (so a fence line after it belongs to the string)."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(code).readline):
            pass
    except (tokenize.TokenError, SyntaxError) as e:  # ("EOF in multi-line string"; 3.12: "unterminated
        return "string" in str(e.args[0] if e.args else e)  # triple-quoted string literal")
    return False


def code_blocks(response: str) -> list[str]:
    """The Python fenced blocks of a response, in order (bodies dedented, trailing blank lines dropped)."""
    blocks, pos = [], 0
    while True:
        opening = _OPEN.search(response, pos)
        if opening is None:
            return blocks
        start = opening.end()
        closings = list(re.finditer(_CLOSE % opening.group("ticks"), response[start:], re.MULTILINE))
        if not closings:  # an unclosed block (a response cut by the length limit): nothing after it is code
            return blocks
        python = opening.group("tag").lower() in _PYTHON_TAGS
        body_of = lambda closing: textwrap.dedent(response[start:start + closing.start()])  # noqa: E731
        # The first closing fence outside the block's strings (only Python has strings to look into).
        closing = next((c for c in closings if not _inside_string(body_of(c))), closings[0]) if python else closings[0]
        pos = start + closing.end()
        body = body_of(closing).rstrip() + "\n"
        if python and body.strip():
            blocks.append(body)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # (ValueError: a NUL byte)
        return False
    return True


def extract_code(response: str, *, mode: CodeBlockMode = "longest", problem: Problem | None = None) -> str | None:
    """The program inside a response's fenced block, or None if it has none (a format error). ``problem``: the
    block is chosen as the module docstring says (without it: among the blocks that parse)."""
    if mode not in ("longest", "last"):
        raise ValueError(f"unknown code block mode {mode!r} (longest | last)")
    blocks = code_blocks(response)
    if not blocks:
        return None
    candidates = []
    if problem is not None and problem.func_name:
        candidates = [b for b in blocks if defines_function(b, problem.func_name, methods=True)]
    if not candidates:
        candidates = [b for b in blocks if _parses(assemble_program(problem, b) if problem is not None else b)]
    candidates = candidates or blocks
    if mode == "longest":
        return max(candidates, key=len)  # max keeps the first of equally long blocks
    return candidates[-1]


def defines_function(code: str, name: str, *, methods: bool = False) -> bool:
    """Whether `code` parses and defines `name` (its last dotted part) as a top-level function; with `methods`,
    a method of a top-level class counts too (a block that holds a LeetCode-style `Solution` class). HumanEval
    calls a function, so its program assembly asks without `methods`."""
    name = name.rsplit(".", 1)[-1]
    if not re.search(r"\bdef[\s\\]+%s\b" % re.escape(name), code):
        return False  # (no parse needed)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return any((isinstance(n, functions) and n.name == name) or
               (methods and isinstance(n, ast.ClassDef)
                and any(isinstance(m, functions) and m.name == name for m in n.body))
               for n in tree.body)


@functools.lru_cache(maxsize=1024)  # a problem's prompt, stripped for each of its many responses
def strip_function(code: str, name: str) -> str:
    """`code` without its top-level definition of `name` (decorators included); unchanged if absent or unparsable."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            return "".join(lines[:start] + lines[node.end_lineno:])
    return code


def assemble_program(problem: Problem, code: str) -> str:
    """The program to run for `problem` from extracted `code` (see the module docstring for the rule)."""
    if problem.source != "humaneval" or not problem.func_name:
        return code
    if defines_function(code, problem.func_name):
        preamble = strip_function(problem.prompt, problem.func_name).rstrip()
        return (preamble + "\n\n\n" if preamble else "") + code
    first = next((line for line in code.splitlines() if line.strip()), "")
    body = code if first[:1] in (" ", "\t") else textwrap.indent(code, "    ")
    prompt = problem.prompt if problem.prompt.endswith("\n") else problem.prompt + "\n"
    return prompt + body


@dataclass(frozen=True)
class Extraction:
    """The program to run, or why there is none (the format-error feedback text)."""

    program: str | None
    format_error: str | None = None


def extract_program(
    problem: Problem, response: str, *, mode: CodeBlockMode = "longest", truncated: bool = False
) -> Extraction:
    """Extract and assemble the program of `response`; without a code block, the format error's feedback text
    (the truncation message when the response hit the length limit)."""
    code = extract_code(response, mode=mode, problem=problem)
    if code is None:
        return Extraction(None, TRUNCATED_TEXT if truncated else FORMAT_ERROR_TEXT)
    return Extraction(assemble_program(problem, code))
