"""The problem format every loader produces and every grader consumes (one JSON object per line on disk).

Tests come in three kinds; in all of them the expected answer stays in the trusted process:
- ``stdin``: the program reads ``input`` on standard input; its standard output is compared with ``output``.
- ``functional``: ``input`` holds one JSON value per line, the arguments of ``func_name`` (a function, or a
  method of class ``Solution``); the JSON-decoded return value is compared with the JSON value ``output``.
- ``check``: ``input`` is trusted Python test code (e.g. a HumanEval ``assert``) run by the grader with
  ``candidate`` bound to a proxy that calls the program's ``func_name`` inside the sandbox and returns
  plain data; ``check_setup`` (imports, helpers the test code uses) runs before it. ``output`` is unused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SandboxError(ValueError):
    """Bad input to the sandbox a user can fix (a file, a problem, a setting); the message says what to fix."""

    user_facing = True


class ProblemError(SandboxError):
    """A problem that cannot be graded: no tests, a malformed test, trusted test code that fails by itself."""


class ProblemTest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["stdin", "functional", "check"]
    input: str
    output: str = ""
    public: bool = Field(False, description="Shown in the problem statement (LiveCodeBench public tests).")


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    prompt: str = Field(description="The problem statement shown to the model.")
    starter_code: str = ""
    tests: list[ProblemTest] = Field(description="Every test of the problem; train/validation splits pick subsets.")
    func_name: str | None = Field(None, description="Entry point of functional and check tests.")
    check_setup: str | None = Field(None, description="Trusted code run before each check test.")
    solution: str | None = Field(None, description="A reference solution where the source has one.")
    date: str | None = Field(None, description="ISO date of the problem (LiveCodeBench contest_date).")
    difficulty: str | None = None
    source: str = Field("jsonl", description="humaneval | livecodebench | jsonl")
