"""The problem format: strict fields, defaults, JSON round trip, user-facing errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sandbox.problems import Problem, ProblemError, ProblemTest, SandboxError


def test_json_round_trip_keeps_every_field():
    problem = Problem(
        id="p1", prompt="Square it.", starter_code="def sq(x):\n", func_name="sq", check_setup="import math\n",
        solution="def sq(x):\n    return x * x\n", date="2025-03-01", difficulty="easy", source="jsonl",
        tests=[ProblemTest(kind="functional", input="3", output="9", public=True),
               ProblemTest(kind="check", input="assert candidate(2) == 4")],
    )
    again = Problem.model_validate_json(problem.model_dump_json())
    assert again == problem
    assert again.tests[1].output == "" and again.tests[1].public is False


def test_unknown_fields_kinds_and_empty_ids_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        Problem.model_validate({"id": "a", "prompt": "p", "tests": [], "tset": []})
    with pytest.raises(ValidationError, match="kind"):
        ProblemTest.model_validate({"kind": "interactive", "input": ""})
    with pytest.raises(ValidationError, match="id"):
        Problem(id="", prompt="p", tests=[])


def test_problems_are_immutable():
    problem = Problem(id="a", prompt="p", tests=[])
    with pytest.raises(ValidationError):
        problem.id = "b"


def test_errors_are_user_facing():
    assert SandboxError.user_facing and issubclass(ProblemError, SandboxError)
    assert issubclass(SandboxError, ValueError)


def test_sandbox_imports_no_torch_and_exposes_its_names():
    import subprocess
    import sys

    code = ("import sys, sandbox\n"
            "assert all(hasattr(sandbox, n) for n in sandbox.__all__)\n"
            "print(sorted(m for m in ('torch', 'vllm', 'ray', 'deepspeed', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
