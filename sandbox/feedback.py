"""World feedback: the LeetCode-style text of METHOD.md section 3, a pure function of per-test results.

Which failure is shown, in order: the first runtime error ("Runtime Error", the exception with at most 3
solution frames, the last executed input); else the first time limit; else the first memory or output limit;
else a format error (no code block, or a truncation message); else up to 2 wrong answers, shortest
(input + output) first, each with Input, Output, Expected and optional Debug Output (stderr). Inputs show at
most 8 lines, every value at most 250 characters, debug output at most 10 lines; the whole text at most 2,000.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TestStatus = Literal["passed", "wrong_answer", "runtime_error", "time_limit", "memory_limit", "output_limit", "not_run"]

FORMAT_ERROR_TEXT = "Incorrect Format: Put your code inside a ```python ... ``` block."
TRUNCATED_TEXT = (
    "Truncated Attempt: Your previous response was too long and truncated because it reached the maximum "
    "response length. Try again with a shorter response."
)
MAX_CHARS = 2000
MAX_VALUE_CHARS = 250
MAX_INPUT_LINES = 8
MAX_DEBUG_LINES = 10
MAX_DEBUG_LINE_CHARS = 300
MAX_WRONG_ANSWERS = 2

# A surrogate code point is no character: text holding one (a program's error message can, through JSON's
# "\ud800") cannot be written as UTF-8, printed or tokenized.
_SURROGATE = re.compile("[\ud800-\udfff]")


def as_text(text: str) -> str:
    """``text`` with every surrogate code point replaced by U+FFFD, as bytes decoded with errors="replace" are."""
    return _SURROGATE.sub("\ufffd", text)


_LIMIT_HEADERS = {
    "time_limit": "Time Limit Exceeded",
    "memory_limit": "Memory Limit Exceeded",
    "output_limit": "Output Limit Exceeded",
}


class TestResult(BaseModel):
    """The outcome of one test, everything as text ready to show (all of it from the trusted side)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    __test__ = False  # not a pytest test class

    index: int = Field(description="0-based position in the graded tests; feedback shows 'Test Case index+1'.")
    kind: Literal["stdin", "functional", "check"]
    status: TestStatus
    input: str = Field("", description="The input as shown: stdin text, argument lines, or the last call made.")
    output: str | None = Field(None, description="What the program produced (stdout, or the returned value).")
    expected: str | None = Field(None, description="The expected output, when the test states one.")
    error: str | None = Field(None, description="Exception and solution frames (runtime error), or why a WA.")
    stderr: str = Field("", description="The program's standard error (shown as Debug Output).")
    wall_s: float = 0.0

    @field_validator("input", "output", "expected", "error", "stderr")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else as_text(value)


def _clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _input_block(title: str, text: str) -> list[str]:
    lines = text.splitlines()
    out = [title, *(_clip(line) for line in lines[:MAX_INPUT_LINES])]
    if len(lines) > MAX_INPUT_LINES:
        out.append(f"... ({len(lines) - MAX_INPUT_LINES} more lines)")
    return out


def _debug_block(stderr: str) -> list[str]:
    text = stderr.strip()
    if not text:
        return []
    lines = text.split("\n")
    out = ["", "Debug Output", *(_clip(line, MAX_DEBUG_LINE_CHARS) for line in lines[:MAX_DEBUG_LINES])]
    if len(lines) > MAX_DEBUG_LINES:
        out.append(f"... ({len(lines) - MAX_DEBUG_LINES} more lines)")
    return out


def _error_lines(error: str) -> list[str]:
    return [_clip(line) for line in error.strip().splitlines()]


def render_feedback(results: Sequence[TestResult], *, format_error: bool = False, truncated: bool = False) -> str:
    """The feedback text for one graded response; "" when every test passed.

    `format_error`: the response had no code block (then `results` is usually empty); `truncated`: the response
    hit the length limit, which turns the format error into the truncation message.
    """
    first = {status: next((r for r in results if r.status == status), None) for status in
             ("runtime_error", "time_limit", "memory_limit", "output_limit")}
    parts: list[str] = []
    if first["runtime_error"] is not None:
        r = first["runtime_error"]
        parts += ["Runtime Error", *_error_lines(r.error or "the program exited with an error"), ""]
        parts += _input_block("Last Executed Input", r.input)
        parts += _debug_block(r.stderr)
    elif any(first[s] is not None for s in _LIMIT_HEADERS):
        status = next(s for s in _LIMIT_HEADERS if first[s] is not None)
        r = first[status]
        parts += [_LIMIT_HEADERS[status], ""]
        parts += _input_block("Last Executed Input", r.input)
        parts += _debug_block(r.stderr)
    elif format_error:
        parts.append(TRUNCATED_TEXT if truncated else FORMAT_ERROR_TEXT)
    else:
        wrong = [r for r in results if r.status == "wrong_answer"]
        # sorted() is stable: equally short cases keep test order, so the text is deterministic.
        wrong = sorted(wrong, key=lambda r: len(r.input) + len(r.output or ""))[:MAX_WRONG_ANSWERS]
        for r in wrong:
            parts += [f"Test Case {r.index + 1}: Wrong Answer", ""]
            parts += _input_block("Input", r.input)
            parts += ["", "Output", _clip(r.output if r.output is not None else "(no output)")]
            if r.error:
                parts += _error_lines(r.error)
            if r.expected is not None:
                parts += ["", "Expected", _clip(r.expected)]
            parts += _debug_block(r.stderr)
            parts.append("")
    return as_text("\n".join(parts).rstrip()[:MAX_CHARS])
