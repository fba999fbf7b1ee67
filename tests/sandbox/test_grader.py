"""Grader on hand-made outcomes (a fake executor): comparison rules, verdicts, check tests, bad problems."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from sandbox.grader import GradeRequest, Grader, call_target, stdout_matches, validate_problem, values_equal
from sandbox.problems import Problem, ProblemError, ProblemTest


@dataclass
class Run:
    status: str = "ok"
    exit_code: int | None = 0
    stdout: bytes = b""
    stderr: bytes = b""
    wall_s: float = 0.01
    error: str | None = None


@dataclass
class Call:
    status: str = "ok"
    value: Any = None
    stdout: bytes = b""
    stderr: bytes = b""
    wall_s: float = 0.01
    error: str | None = None


class FakeShared:
    """As the executor's ``SharedLimit``: the calls of one test."""

    def __init__(self, session: FakeSession, timeout_s: float):
        self.session, self.timeout_s, self.end_status = session, timeout_s, None

    def call(self, target: str, args: list) -> Call:
        return self.session.call(target, args, timeout_s=self.timeout_s)


class FakeSession:
    def __init__(self, on_stdin, on_call, log, on_end=None):
        self.on_stdin, self.on_call, self.log, self.on_end = on_stdin, on_call, log, on_end

    @contextlib.contextmanager
    def shared_limit(self, *, timeout_s: float):
        """As the executor's: ``end_status`` is what ``on_end`` says when the block is left."""
        shared = FakeShared(self, timeout_s)
        try:
            yield shared
        finally:
            shared.end_status = self.on_end() if self.on_end else None

    def run_stdin(self, stdin: bytes, *, timeout_s: float) -> Run:
        self.log.append(("stdin", stdin))
        return self.on_stdin(stdin)

    def call(self, target: str, args: list, *, timeout_s: float) -> Call:
        self.log.append(("call", target, args))
        return self.on_call(target, args)

    def run_stdin_many(self, stdins: list, *, timeout_s: float, stop_after=frozenset()) -> list[Run]:
        """As the executor's: runs in order, stopping after a run whose status is in stop_after."""
        outcomes: list[Run] = []
        for stdin in stdins:
            outcomes.append(self.run_stdin(stdin, timeout_s=timeout_s))
            if outcomes[-1].status in stop_after:
                break
        return outcomes

    def call_many(self, target: str, args_list: list, *, timeout_s: float, last: bool = False) -> list[Call]:
        """As the executor's: calls in order; once a limit ends the program, the rest answer with that failure."""
        outcomes: list[Call] = []
        for args in args_list:
            ended = outcomes and outcomes[-1].status in ("time_limit", "memory_limit", "output_limit")
            outcomes.append(outcomes[-1] if ended else self.call(target, args, timeout_s=timeout_s))
        return outcomes


class FakeExecutor:
    """Maps a program's text to how it behaves; records what was run."""

    n_workers = 2

    def __init__(self, on_stdin: Callable[[bytes], Run] | None = None,
                 on_call: Callable[[str, list], Call] | None = None, on_end: Callable[[], Call | None] | None = None):
        self.on_stdin = on_stdin or (lambda stdin: Run())
        self.on_call = on_call or (lambda target, args: Call())
        self.on_end = on_end
        self.log: list = []
        self.programs: list[str] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def session(self, code: str, *, limits=None):
        with self.lock:
            self.programs.append(code)
        yield FakeSession(self.on_stdin, self.on_call, self.log, self.on_end)


ADD = Problem(id="add", prompt="Print a+b.", tests=[
    ProblemTest(kind="stdin", input="1 2\n", output="3\n"),
    ProblemTest(kind="stdin", input="10 20\n", output="30\n"),
    ProblemTest(kind="stdin", input="2 2\n", output="4\n"),
])


def adder(stdin: bytes) -> Run:
    a, b = map(int, stdin.split())
    return Run(stdout=f"{a + b}\n".encode())


def respond(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\n"


# ------------------------------------------------------------------------------------------- comparison rules


@pytest.mark.parametrize("actual, expected, ok", [
    ("3\n", "3", True),
    ("  3  \r\n\n", "3\n", True),
    ("1 2\n3\n", "1 2\n3", True),
    ("1.0\n", "1", True),            # same number as Decimal
    ("1.50 2\n", "1.5 2.0", True),
    ("1.0000001\n", "1", False),     # exact without tolerance
    ("Yes\n", "YES", False),
    ("3\n4\n", "3", False),
    ("", "", True),
    ("3 4", "3  4", True),           # all tokens are numbers: compared token by token
    ("a b", "a  b", False),          # words: the lines must be equal
])
def test_stdout_rule(actual, expected, ok):
    assert stdout_matches(actual, expected) is ok


@pytest.mark.parametrize("actual, expected", [("sNaN", "1"), ("1", "sNaN"), ("NaN", "NaN0"), ("inf", "Infinity"),
                                              ("1e999999999", "1")])
def test_stdout_odd_numbers_do_not_match_and_do_not_raise(actual, expected):
    assert stdout_matches(actual, expected) is False
    assert stdout_matches(actual, expected, float_tolerance=1e-6) is False


def test_huge_ints_compare_exactly_even_with_tolerance():
    assert values_equal(10**400, 10**400, float_tolerance=1e-6)
    assert not values_equal(10**400, 10**400 + 1, float_tolerance=1e-6)
    assert not values_equal(10**400, 1.0, float_tolerance=1e-6)


def test_stdout_tolerance_is_relative_and_absolute():
    assert stdout_matches("0.3333333\n", "0.33333333", float_tolerance=1e-6)
    assert not stdout_matches("0.3333\n", "0.33333333", float_tolerance=1e-6)
    assert stdout_matches("1000000.5\n", "1000000.0", float_tolerance=1e-6)  # relative: 0.5 <= 1e-6 * 1e6
    assert stdout_matches("nan\n", "nan")  # identical text


@pytest.mark.parametrize("actual, expected, ok", [
    ((1, 2), [1, 2], True),
    ([(1, 2), (3,)], [[1, 2], [3]], True),
    ({"a": (1,)}, {"a": [1]}, True),
    ([1, 2], [2, 1], False),
    (1, 1.0, True),
    ("1", 1, False),
    (None, [], False),
    ({1, 2}, [1, 2], False),
    (0.1 + 0.2, 0.3, False),
    (True, True, True),
    ([1, 2], [1, 2, 3], False),
])
def test_values_equal(actual, expected, ok):
    assert values_equal(actual, expected) is ok


def test_values_equal_with_tolerance():
    assert values_equal([0.1 + 0.2], [0.3], float_tolerance=1e-9)
    assert not values_equal([0.31], [0.3], float_tolerance=1e-9)
    assert not values_equal(float("nan"), float("nan"))


# ------------------------------------------------------------------------------------------------ stdin tests


def test_accepted_program_runs_every_test_and_code_is_the_extracted_block():
    ex = FakeExecutor(on_stdin=adder)
    verdict = Grader(ex).grade(ADD, respond("print(sum(map(int, input().split())))"))
    assert (verdict.verdict, verdict.passed, verdict.tests_passed, verdict.tests_total) == ("accepted", True, 3, 3)
    assert verdict.feedback == ""
    assert ex.programs == ["print(sum(map(int, input().split())))\n"]
    assert [entry[1] for entry in ex.log] == [b"1 2\n", b"10 20\n", b"2 2\n"]


def test_wrong_answer_feedback_shows_the_shortest_failures():
    def off_by_one(stdin):
        a, b = map(int, stdin.split())
        return Run(stdout=f"{a + b + (a != 2)}\n".encode(), stderr=b"debugging\n")

    verdict = Grader(FakeExecutor(on_stdin=off_by_one)).grade(ADD, respond("x"))
    assert (verdict.verdict, verdict.tests_passed, verdict.tests_total) == ("wrong_answer", 1, 3)
    assert [t.status for t in verdict.tests] == ["wrong_answer", "wrong_answer", "passed"]
    assert verdict.feedback == (
        "Test Case 1: Wrong Answer\n\nInput\n1 2\n\nOutput\n4\n\nExpected\n3\n\nDebug Output\ndebugging\n\n"
        "Test Case 2: Wrong Answer\n\nInput\n10 20\n\nOutput\n31\n\nExpected\n30\n\nDebug Output\ndebugging")


def test_stop_at_first_failure_skips_the_rest():
    ex = FakeExecutor(on_stdin=lambda stdin: Run(stdout=b"0\n"))
    verdict = Grader(ex, stop_at_first_failure=True).grade(ADD, respond("print(0)"))
    assert [t.status for t in verdict.tests] == ["wrong_answer", "not_run", "not_run"]
    assert (verdict.verdict, verdict.tests_passed, verdict.tests_total) == ("wrong_answer", 0, 3)
    assert len(ex.log) == 1


def test_runtime_error_beats_wrong_answer_and_time_limit_stops_the_run():
    outcomes = {b"1 2\n": Run(stdout=b"7\n"), b"10 20\n": Run(status="runtime_error", exit_code=1, error=(
        "ZeroDivisionError: division by zero")), b"2 2\n": Run(status="time_limit", exit_code=None)}
    verdict = Grader(FakeExecutor(on_stdin=outcomes.__getitem__)).grade(ADD, respond("x"))
    assert verdict.verdict == "runtime_error"
    assert verdict.feedback == "Runtime Error\nZeroDivisionError: division by zero\n\nLast Executed Input\n10 20"

    ex = FakeExecutor(on_stdin=lambda stdin: Run(status="time_limit", exit_code=None))
    verdict = Grader(ex).grade(ADD, respond("while True: pass"))
    assert verdict.verdict == "time_limit" and [t.status for t in verdict.tests] == ["time_limit", "not_run", "not_run"]
    assert verdict.feedback == "Time Limit Exceeded\n\nLast Executed Input\n1 2"
    verdict = Grader(ex, stop_after_time_limit=False).grade(ADD, respond("while True: pass"))
    assert [t.status for t in verdict.tests] == ["time_limit"] * 3


@pytest.mark.parametrize("status", ["memory_limit", "output_limit"])
def test_memory_and_output_limits(status):
    verdict = Grader(FakeExecutor(on_stdin=lambda s: Run(status=status, exit_code=None))).grade(ADD, respond("x"))
    assert verdict.verdict == status and not verdict.passed


def test_nonzero_exit_without_error_is_a_runtime_error():
    verdict = Grader(FakeExecutor(on_stdin=lambda s: Run(exit_code=3, stdout=b"3\n"))).grade(ADD, respond("x"))
    assert verdict.verdict == "runtime_error"
    assert verdict.feedback.startswith("Runtime Error\nthe program exited with code 3\n")


def test_non_utf8_output_is_a_clear_wrong_answer():
    verdict = Grader(FakeExecutor(on_stdin=lambda s: Run(stdout=b"3\xff\xfe\n"))).grade(ADD, respond("x"))
    assert verdict.verdict == "wrong_answer" and verdict.tests_passed == 0
    assert "(the output is not valid UTF-8)" in verdict.feedback
    assert "3\ufffd\ufffd" in verdict.feedback


def test_format_error_and_truncation_run_nothing():
    ex = FakeExecutor(on_stdin=adder)
    verdict = Grader(ex).grade(ADD, "I think the answer is to add them.")
    assert (verdict.verdict, verdict.passed, verdict.tests_passed, verdict.tests_total) == ("format_error", False, 0, 3)
    assert verdict.feedback == "Incorrect Format: Put your code inside a ```python ... ``` block."
    verdict = Grader(ex).grade(ADD, "```python\nprint(", truncated=True)
    assert verdict.feedback.startswith("Truncated Attempt:")
    assert ex.programs == []


def test_subset_of_tests_and_code_block_setting():
    ex = FakeExecutor(on_stdin=adder)
    verdict = Grader(ex, code_block="last").grade(ADD, respond("first") + respond("second"), tests=ADD.tests[1:])
    assert (verdict.tests_passed, verdict.tests_total) == (2, 2)
    assert ex.programs == ["second\n"]


# ----------------------------------------------------------------------------------------- functional tests

PAIR = Problem(id="pair", prompt="p", func_name="maxPair",
               starter_code="class Solution:\n    def maxPair(self, nums, k):\n        ",
               tests=[ProblemTest(kind="functional", input="[1, 2, 3]\n0", output="5"),
                      ProblemTest(kind="functional", input="[5, 5]\n1", output="11"),
                      ProblemTest(kind="functional", input='"ab"\n2', output="[1, 2]")])


def test_functional_arguments_are_json_lines_and_target_follows_the_program():
    def behave(target, args):
        if args[0] == "ab":
            return Call(value=(1, 2))  # a tuple equals the JSON list
        nums, k = args
        return Call(value=sum(sorted(nums)[-2:]) + k + (k == 1))

    ex = FakeExecutor(on_call=behave)
    program = "class Solution:\n    def maxPair(self, nums, k):\n        return 0\n"
    verdict = Grader(ex).grade(PAIR, respond(program))
    assert [entry[1:] for entry in ex.log] == [("Solution.maxPair", [[1, 2, 3], 0]), ("Solution.maxPair", [[5, 5], 1]),
                                                ("Solution.maxPair", ["ab", 2])]
    assert [t.status for t in verdict.tests] == ["passed", "wrong_answer", "passed"]
    assert verdict.feedback == "Test Case 2: Wrong Answer\n\nInput\n[5, 5]\n1\n\nOutput\n12\n\nExpected\n11"


def test_call_target():
    assert call_target(PAIR, "class Solution:\n    def maxPair(self, a, b):\n        pass\n") == "Solution.maxPair"
    assert call_target(PAIR, "def maxPair(nums, k):\n    pass\n") == "maxPair"
    assert call_target(PAIR, "syntax error (") == "Solution.maxPair"  # falls back on the starter code
    plain = PAIR.model_copy(update={"starter_code": ""})
    assert call_target(plain, "syntax error (") == "maxPair"


def test_functional_failure_of_the_call():
    ex = FakeExecutor(on_call=lambda t, a: Call(status="runtime_error", error="IndexError: list index out of range"))
    verdict = Grader(ex).grade(PAIR, respond("def maxPair(nums, k):\n    return nums[9]\n"))
    assert verdict.verdict == "runtime_error"
    assert verdict.feedback == ("Runtime Error\nIndexError: list index out of range\n\n"
                                "Last Executed Input\n[1, 2, 3]\n0")


# ---------------------------------------------------------------------------------------------- check tests

CHECK = Problem(
    id="sq", prompt="def sq(x):\n    pass\n", func_name="sq", source="humaneval",
    check_setup="import math\n\ndef helper(v):\n    return v * 2\n",
    tests=[ProblemTest(kind="check", input="assert candidate(3) == 9\n"),
           ProblemTest(kind="check", input="assert candidate(helper(2)) == helper(8)\n"),
           ProblemTest(kind="check", input="for i in range(3):\n    assert math.isclose(candidate(i), i * i)\n")])


def test_check_tests_call_the_program_through_the_proxy():
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] ** 2))
    verdict = Grader(ex).grade(CHECK, respond("def sq(x):\n    return x * x\n"))
    assert verdict.verdict == "accepted" and verdict.tests_passed == 3
    assert [entry[1:] for entry in ex.log] == [("sq", [3]), ("sq", [4]), ("sq", [0]), ("sq", [1]), ("sq", [2])]


def test_failed_assertion_records_the_call_and_the_expected_value():
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] * 3))
    verdict = Grader(ex).grade(CHECK, respond("def sq(x):\n    return x * 3\n"))
    assert [t.status for t in verdict.tests] == ["passed", "wrong_answer", "wrong_answer"]
    assert verdict.verdict == "wrong_answer" and verdict.tests_passed == 1
    # Test 3 (input+output 6 chars) comes before test 2 (7 chars); it has no plain expected value, so the
    # assertion is shown; test 2 compares with helper(8) = 16.
    assert verdict.feedback == (
        "Test Case 3: Wrong Answer\n\nInput\nsq(1)\n\nOutput\n3\n\nExpected\n"
        "for i in range(3):\n    assert math.isclose(candidate(i), i * i)\n\n"
        "Test Case 2: Wrong Answer\n\nInput\nsq(4)\n\nOutput\n12\n\nExpected\n16")


def test_test_code_choking_on_a_returned_value_is_a_wrong_answer():
    ex = FakeExecutor(on_call=lambda t, args: Call(value=None))
    verdict = Grader(ex).grade(CHECK, respond("def sq(x):\n    return None\n"))
    third = verdict.tests[2]
    assert third.status == "wrong_answer" and third.error.startswith("the test raised TypeError")


def test_a_failing_call_gives_its_status():
    ex = FakeExecutor(on_call=lambda t, args: Call(status="time_limit"))
    verdict = Grader(ex).grade(CHECK, respond("def sq(x):\n    while True: pass\n"))
    assert verdict.verdict == "time_limit"
    assert verdict.feedback == "Time Limit Exceeded\n\nLast Executed Input\nsq(3)"


def test_a_check_test_over_its_limit_after_its_last_call_is_a_time_limit():
    # The test's process spent more than the limit in all, after its last call (what the executor finds when it
    # ends the test's process): the test is time_limit whatever its calls answered, and the tests after it
    # are not run. Test 1 is planned (its one call made ahead, in a process of its own): no shared limit.
    ended = []
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] ** 2),
                      on_end=lambda: ended.append(1) or Call(status="time_limit"))
    verdict = Grader(ex, time_limit_s=2.0).grade(CHECK, respond("def sq(x):\n    return x * x\n"))
    assert [t.status for t in verdict.tests] == ["passed", "time_limit", "not_run"] and len(ended) == 1
    assert verdict.verdict == "time_limit" and verdict.feedback == "Time Limit Exceeded\n\nLast Executed Input\nsq(4)"


def test_body_only_response_is_assembled_with_the_prompt():
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] ** 2))
    Grader(ex).grade(CHECK, respond("return x * x"))
    assert ex.programs == ["def sq(x):\n    pass\n    return x * x\n"]


# ----------------------------------------------------------------------------------------------- bad problems


def test_bad_problems_raise_clear_errors():
    with pytest.raises(ProblemError, match="problem add has no tests"):
        Grader(FakeExecutor()).grade(ADD, respond("x"), tests=[])
    bad_json = PAIR.model_copy(update={"tests": [ProblemTest(kind="functional", input="[1, 2\n0", output="3")]})
    with pytest.raises(ProblemError, match=r"problem pair: test 1 \(functional\) is malformed"):
        validate_problem(bad_json)
    with pytest.raises(ProblemError, match="func_name 'max-pair' is not a name"):
        validate_problem(PAIR.model_copy(update={"func_name": "max-pair"}))
    no_func = PAIR.model_copy(update={"func_name": None})
    with pytest.raises(ProblemError, match="without func_name"):
        validate_problem(no_func)
    bad_setup = CHECK.model_copy(update={"check_setup": "raise RuntimeError('broken')"})
    with pytest.raises(ProblemError, match="check_setup fails: RuntimeError: broken"):
        validate_problem(bad_setup)
    bad_check = CHECK.model_copy(update={"tests": [ProblemTest(kind="check", input="assert candidate(undefined)")]})
    with pytest.raises(ProblemError, match="fails before calling candidate: NameError"):
        Grader(FakeExecutor()).grade(bad_check, respond("def sq(x):\n    return 1\n"))


# ---------------------------------------------------------------------------------------------- grade_many


def test_grade_many_keeps_order_and_validates_first():
    ex = FakeExecutor(on_stdin=adder, on_call=lambda t, args: Call(value=args[0] ** 2))
    grader = Grader(ex, n_threads=3)
    items = [GradeRequest(ADD, respond("a")), (CHECK, respond("b")), GradeRequest(ADD, "no code"),
             GradeRequest(ADD, respond("c"), tests=ADD.tests[:1])] * 5
    verdicts = grader.grade_many(items, progress=False)
    assert [v.verdict for v in verdicts] == ["accepted", "accepted", "format_error", "accepted"] * 5
    assert [v.tests_total for v in verdicts] == [3, 3, 3, 1] * 5
    assert grader.grade_many([]) == []

    empty = ADD.model_copy(update={"id": "empty", "tests": []})
    ex.programs.clear()
    with pytest.raises(ProblemError, match="problem empty has no tests"):
        grader.grade_many([GradeRequest(ADD, respond("a")), GradeRequest(empty, respond("b"))])
    assert ex.programs == []  # nothing ran


def test_check_code_may_name_the_entry_point_itself():
    # HumanEval/33's check compares candidate(x) with sort_third(x): both must reach the program.
    problem = CHECK.model_copy(update={"tests": [ProblemTest(kind="check", input="assert candidate(2) == sq(2)\n")]})
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] + 1))
    verdict = Grader(ex).grade(problem, respond("def sq(x):\n    return x + 1\n"))
    assert verdict.verdict == "accepted"
    assert [entry[1:] for entry in ex.log] == [("sq", [2]), ("sq", [2])]


def test_check_feedback_uses_python_reprs():
    problem = CHECK.model_copy(update={"tests": [ProblemTest(kind="check", input="assert candidate('a') == False\n")]})
    verdict = Grader(FakeExecutor(on_call=lambda t, args: Call(value=None))).grade(problem, respond("def sq(x): pass"))
    assert verdict.feedback == "Test Case 1: Wrong Answer\n\nInput\nsq('a')\n\nOutput\nNone\n\nExpected\nFalse"


def test_session_budget_grows_with_the_tests():
    from sandbox.executor import Limits

    seen = []

    class WithLimits(FakeExecutor):
        limits = Limits(wall_s=10.0, cpu_s=10.0)

        @contextlib.contextmanager
        def session(self, code, *, limits=None):
            seen.append(limits)
            yield FakeSession(self.on_stdin, self.on_call, self.log)

    Grader(WithLimits(on_stdin=adder), time_limit_s=4.0).grade(ADD, respond("x"))
    assert (seen[0].wall_s, seen[0].cpu_s, seen[0].memory_mb) == (16.0, 16.0, 1024)  # 4 s x (3 tests + 1)
    Grader(WithLimits(on_stdin=adder), time_limit_s=1.0).grade(ADD, respond("x"))
    assert seen[1].wall_s == 10.0  # never below the executor's own budget


# ------------------------------------------------------------------------------------ on the real executor


@pytest.fixture(scope="module")
def sandbox_executor():
    from sandbox.executor import Executor

    with Executor(2) as executor:
        yield executor


def test_real_functional_problem_with_class_solution(sandbox_executor):
    grader = Grader(sandbox_executor)
    good = "class Solution:\n    def maxPair(self, nums, k):\n        return sum(sorted(nums)[-2:]) + k\n"
    verdict = grader.grade(PAIR.model_copy(update={"tests": PAIR.tests[:2]}), respond(good))
    assert (verdict.verdict, verdict.tests_passed) == ("accepted", 2)
    # A returned tuple equals the JSON list; a runtime error names the exception and the solution's line.
    tup = "def f(s, k):\n    return (len(s), k)\n"
    problem = Problem(id="t", prompt="p", func_name="f", tests=[ProblemTest(kind="functional", input='"ab"\n2',
                                                                           output="[2, 2]")])
    assert grader.grade(problem, respond(tup)).verdict == "accepted"
    boom = "def f(s, k):\n    return [][k]\n"
    verdict = grader.grade(problem, respond(boom))
    assert verdict.verdict == "runtime_error"
    assert "IndexError" in verdict.feedback and 'Last Executed Input\n"ab"\n2' in verdict.feedback


def test_real_object_with_eq_cannot_pass(sandbox_executor):
    # LiveCodeBench's own grader accepts an object whose __eq__ is always true; here the value must be plain data.
    sneaky = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef f(s, k):\n    return Any()\n"
    problem = Problem(id="t", prompt="p", func_name="f", tests=[ProblemTest(kind="functional", input='"ab"\n2',
                                                                           output="[2, 2]")])
    verdict = Grader(sandbox_executor).grade(problem, respond(sneaky))
    assert not verdict.passed and verdict.verdict == "runtime_error"


def test_real_time_limit_stops_after_the_first_test(sandbox_executor):
    import time

    started = time.perf_counter()
    verdict = Grader(sandbox_executor, time_limit_s=1.0).grade(ADD, respond("while True:\n    pass\n"))
    elapsed = time.perf_counter() - started
    assert verdict.verdict == "time_limit" and [t.status for t in verdict.tests] == ["time_limit", "not_run", "not_run"]
    assert 0.9 < elapsed < 8.0  # one 1-second limit, not three (the machine is shared: generous upper bound)
    assert verdict.feedback == "Time Limit Exceeded\n\nLast Executed Input\n1 2"


def test_real_stdin_reading_open0_and_buffer_is_accepted(sandbox_executor):
    # Correct programs that read open(0) or write sys.stdout.buffer are accepted (outputs compared out here).
    program = ("import sys\na, b = map(int, open(0).read().split())\n"
               "sys.stdout.buffer.write(f'{a + b}\\n'.encode())\n")
    assert Grader(sandbox_executor).grade(ADD, respond(program)).verdict == "accepted"


def test_real_huge_values_are_graded_not_crashed(sandbox_executor):
    # An int far past Python's 4,300-digit str limit cannot be printed: the feedback says so.
    huge = "def sq(x):\n    return 10 ** 20000\n"
    verdict = Grader(sandbox_executor).grade(CHECK, respond(huge))
    assert verdict.verdict == "wrong_answer" and verdict.tests_passed == 0
    assert "Output\n<int too large to show>\n" in verdict.feedback
    functional = Problem(id="f", prompt="p", func_name="sq", tests=[ProblemTest(kind="functional", input="3",
                                                                               output="9")])
    verdict = Grader(sandbox_executor).grade(functional, respond(huge))
    assert verdict.verdict == "wrong_answer" and "<int too large to show>" in verdict.feedback


def test_the_calls_of_one_check_test_share_its_time_limit():
    loop = CHECK.model_copy(update={"tests": [CHECK.tests[2]]})  # three calls in a loop
    ex = FakeExecutor(on_call=lambda t, args: Call(value=args[0] ** 2, wall_s=0.4))
    verdict = Grader(ex, time_limit_s=1.0).grade(loop, respond("def sq(x):\n    return x * x\n"))
    # 0.4 + 0.4 s leave 0.2 s, and the third call gets only that.
    assert verdict.verdict == "accepted"
    timeouts = []
    ex.on_call = lambda t, args: (timeouts.append(None), Call(value=args[0] ** 2, wall_s=0.5))[1]
    verdict = Grader(ex, time_limit_s=1.0).grade(loop, respond("def sq(x):\n    return x * x\n"))
    assert verdict.verdict == "time_limit" and len(timeouts) == 2
    assert verdict.feedback == "Time Limit Exceeded\n\nLast Executed Input\nsq(2)"
