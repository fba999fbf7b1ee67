"""All 164 HumanEval canonical solutions pass in the real sandbox; a wrong variant of each is rejected."""

from __future__ import annotations

import time

import pytest

from sandbox.executor import Executor
from sandbox.grader import GradeRequest, Grader
from sandbox.loaders import load_humaneval


@pytest.fixture(scope="module")
def grader():
    with Executor(2) as executor:
        yield Grader(executor, time_limit_s=10.0)


def test_canonical_solutions_accepted_and_wrong_variants_rejected(grader):
    problems = load_humaneval()
    assert len(problems) == 164
    started = time.perf_counter()
    # The canonical solution as a model would answer: the full function in a python block.
    canonical = grader.grade_many([GradeRequest(p, f"```python\n{p.solution}```") for p in problems])
    # The body replaced by `return None`, answered as a body continuing the prompt.
    wrong = grader.grade_many([GradeRequest(p, "```python\n    return None\n```") for p in problems])
    elapsed = time.perf_counter() - started

    rejected_canonical = {p.id: (v.verdict, v.feedback[:300]) for p, v in zip(problems, canonical) if not v.passed}
    assert rejected_canonical == {}
    assert all(v.tests_passed == v.tests_total == len(p.tests) for p, v in zip(problems, canonical))

    accepted_wrong = [p.id for p, v in zip(problems, wrong) if v.passed]
    assert accepted_wrong == []
    assert all(v.verdict in ("wrong_answer", "runtime_error") for v in wrong)
    # Each rejection says why in the feedback's own words.
    assert all(v.feedback.startswith(("Test Case", "Runtime Error")) for v in wrong)
    print(f"graded {2 * len(problems)} HumanEval responses in {elapsed:.1f} s")
