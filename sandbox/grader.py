"""Grading: run a response's program on a problem's tests in the executor, compare in this (trusted) process.

The untrusted program only produces output (stdout, or a returned value decoded to plain data); every
comparison, and the trusted test code of `check` tests, runs here. Comparison rules (``sandbox/compare.py``):
- stdin: the output's lines against the expected lines, numbers as ASCII decimals;
- functional: each input line is one JSON argument; the returned value against the JSON-decoded expected
  output;
- check (planning their calls: ``sandbox/checks.py``): the trusted test code runs with `candidate` (and the entry point's own name) calling the program
  (a test's calls in one process of it, one after another: they share the test's state and time limit);
  AssertionError (or another exception raised by the test code after a call) is a wrong answer, a failed call
  has the call's status. Feedback shows the last call, its returned value and, for `assert candidate(..) == X`,
  the value of X, as Python reprs (functional tests show JSON, as their tests are written).
Texts kept per test (input, output, expected, stderr) are cut at 10,000 characters so verdicts stay small.
Verdict of a response: accepted when every test passed, else the most telling failure: runtime error, time
limit, memory limit, output limit, wrong answer (the order in which feedback reports them).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.checks import call_text, expected_of_assert, same_plain_data, planned_call_args, trusted_code
from sandbox.compare import safe_repr, show_value, stdout_matches, values_equal
from sandbox.extract import CodeBlockMode, assemble_program, extract_program
from sandbox.feedback import TestResult, as_text, render_feedback
from sandbox.problems import Problem, ProblemError, ProblemTest

VerdictName = Literal[
    "accepted", "wrong_answer", "runtime_error", "time_limit", "memory_limit", "output_limit", "format_error"
]
# Failure statuses by precedence: the verdict of a response is the first of these that any test has.
FAILURE_ORDER = ("runtime_error", "time_limit", "memory_limit", "output_limit", "wrong_answer")
_FUNC_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?")


_KEEP_CHARS = 10_000


def _keep(text: str | None) -> str | None:
    return text if text is None or len(text) <= _KEEP_CHARS else text[:_KEEP_CHARS] + "..."


def _test_result(**fields: Any) -> TestResult:
    for name in ("input", "output", "expected", "error", "stderr"):
        if name in fields:
            fields[name] = _keep(fields[name])
    return TestResult(**fields)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: VerdictName
    passed: bool = Field(description="Every test passed (reward 1).")
    tests_passed: int
    tests_total: int
    feedback: str = Field(description="World feedback text (METHOD.md section 3); empty when accepted.")
    tests: list[TestResult] = Field(default_factory=list, description="Per-test results, in test order.")

    @field_validator("feedback")
    @classmethod
    def _text(cls, value: str) -> str:
        return as_text(value)  # (text a program wrote: never a surrogate code point)

    @property
    def fraction_passed(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else 0.0


@dataclass(frozen=True)
class GradeRequest:
    """One response to grade; `tests` picks a subset of the problem's tests (e.g. the train half)."""

    problem: Problem
    response: str
    tests: Sequence[ProblemTest] | None = None
    truncated: bool = False


def _decode(data: bytes) -> tuple[str, bool]:
    """(text, valid UTF-8); invalid bytes become U+FFFD so the text can still be shown."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


# ------------------------------------------------------------------------------------------ problem validation


def functional_args(test: ProblemTest) -> list[Any]:
    """The JSON arguments of a functional test, one per non-blank input line."""
    return [json.loads(line) for line in test.input.split("\n") if line.strip()]


def validate_problem(problem: Problem, tests: Sequence[ProblemTest] | None = None) -> None:
    """Raise ProblemError (naming the problem and test) if `problem` cannot be graded with `tests`."""
    tests = problem.tests if tests is None else tests
    where = f"problem {problem.id}"
    if not tests:
        raise ProblemError(f"{where} has no tests to grade against")
    if problem.func_name is not None and not _FUNC_NAME.fullmatch(problem.func_name):
        raise ProblemError(f"{where}: func_name {problem.func_name!r} is not a name or Class.name")
    for i, test in enumerate(tests):
        try:
            if test.kind == "functional":
                if not problem.func_name:
                    raise ProblemError("functional test without func_name")
                functional_args(test)
                json.loads(test.output)
            elif test.kind == "check":
                if not problem.func_name:
                    raise ProblemError("check test without func_name")
                trusted_code(test.input, "<check>")
        except (json.JSONDecodeError, SyntaxError) as err:
            raise ProblemError(f"{where}: test {i + 1} ({test.kind}) is malformed: {err}") from None
        except ProblemError as err:
            raise ProblemError(f"{where}: test {i + 1}: {err}") from None
    if any(t.kind == "check" for t in tests) and problem.check_setup:
        try:
            exec(trusted_code(problem.check_setup, "<check_setup>"), {"__name__": "check_setup"})
        except Exception as err:  # trusted code that fails by itself: the problem, not the program, is wrong
            raise ProblemError(f"{where}: check_setup fails: {type(err).__name__}: {err}") from None


def call_target(problem: Problem, program: str) -> str:
    """What functional and check tests call: `Solution.<func_name>` when the program (or, if it does not parse,
    the starter code) defines class Solution with that method, else `<func_name>`."""
    name = problem.func_name or ""
    if "." in name or ("class Solution" not in program and "class Solution" not in problem.starter_code):
        return name  # (what the parse below would find too: no class Solution anywhere)
    for code in (program, problem.starter_code):
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "Solution":
                if any(isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name == name for m in node.body):
                    return f"Solution.{name}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return name
    # LeetCode starter code ends in an empty method body, so it rarely parses.
    return f"Solution.{name}" if "class Solution" in problem.starter_code else name


def validated_requests(items: Sequence[GradeRequest | tuple]) -> list[GradeRequest]:
    """``items`` as GradeRequests (a tuple holds a request's fields), each problem validated once: a malformed
    problem raises ProblemError before anything is graded."""
    requests = [item if isinstance(item, GradeRequest) else GradeRequest(*item) for item in items]
    checked: set[tuple[int, int]] = set()
    for req in requests:
        key = (id(req.problem), id(req.tests))
        if key not in checked:
            validate_problem(req.problem, req.tests)
            checked.add(key)
    return requests


# ------------------------------------------------------------------------------------------------ check tests


class _CallFailed(Exception):
    """A candidate call that did not return (runtime error, limit); ends the check test with that status."""

    def __init__(self, outcome: Any):
        super().__init__(outcome.status)
        self.outcome = outcome


class _TimeUp:
    """Stands for a call outcome when a check test's time is used up before the call."""

    status = "time_limit"
    error = None


@functools.lru_cache(maxsize=256)
def _session_budget(limits: Any, time_limit_s: float, n_tests: int) -> Any:
    budget = max(limits.wall_s, time_limit_s * (n_tests + 1))
    return limits.model_copy(update={"wall_s": budget, "cpu_s": max(limits.cpu_s, budget)})


# ---------------------------------------------------------------------------------------------------- grader


class Grader:
    """Grades responses on an executor (`sandbox.executor.Executor`): one session per response.

    time_limit_s: per run of a stdin test, per call of a functional test, per check test (all its calls). Each
      run, functional call and check test is a fresh process of the program (its top-level code run again), so
      no CPU time is pooled across tests; a check test's calls run one after another in its one process
      (``Session.shared_limit``), which is billed all the CPU time of its threads and processes from its start
      to its end (what they spend after the last call included: over the limit, the test is ``time_limit``),
      and the calls' summed wall-clock time may not reach the limit before a call is made.
    stop_at_first_failure: skip the remaining tests after the first failure (they count as not passed).
    stop_after_time_limit: skip the remaining tests after a time or memory limit (each would likely cost the
      full limit again); they count as not passed.
    float_tolerance: relative and absolute tolerance for numbers (0: exact, as LiveCodeBench).
    n_threads: responses graded at once by `grade_many` (default: the executor's worker count).
    """

    def __init__(
        self,
        executor: Any,
        *,
        code_block: CodeBlockMode = "longest",
        time_limit_s: float = 6.0,
        stop_at_first_failure: bool = False,
        stop_after_time_limit: bool = True,
        float_tolerance: float = 0.0,
        n_threads: int | None = None,
    ):
        if code_block not in ("longest", "last"):
            raise ValueError(f"unknown code block mode {code_block!r} (longest | last)")
        self.executor = executor
        self.code_block = code_block
        self.time_limit_s = time_limit_s
        self.stop_at_first_failure = stop_at_first_failure
        self.stop_after_time_limit = stop_after_time_limit
        self.float_tolerance = float_tolerance
        self.n_threads = n_threads or getattr(executor, "n_workers", None) or os.cpu_count() or 1

    # -- one response

    def grade(
        self, problem: Problem, response: str, *, tests: Sequence[ProblemTest] | None = None, truncated: bool = False
    ) -> Verdict:
        """Extract the program from `response` and grade it; no code block is a format error."""
        tests = list(problem.tests if tests is None else tests)
        validate_problem(problem, tests)
        return self._grade_valid(problem, response, tests, truncated)

    def _grade_valid(self, problem: Problem, response: str, tests: list[ProblemTest], truncated: bool) -> Verdict:
        extraction = extract_program(problem, response, mode=self.code_block, truncated=truncated)
        if extraction.program is None:
            return Verdict(verdict="format_error", passed=False, tests_passed=0, tests_total=len(tests),
                           feedback=render_feedback([], format_error=True, truncated=truncated))
        return self._run(problem, extraction.program, tests)

    def grade_program(self, problem: Problem, code: str, *, tests: Sequence[ProblemTest] | None = None) -> Verdict:
        """Grade a bare program (no extraction; HumanEval bodies are still assembled with the prompt)."""
        tests = list(problem.tests if tests is None else tests)
        validate_problem(problem, tests)
        return self._run(problem, assemble_program(problem, code), tests)

    def _run(self, problem: Problem, program: str, tests: list[ProblemTest]) -> Verdict:
        target = call_target(problem, program)
        results: list[TestResult] = []
        planned = self._planned_calls(problem, tests)
        made: dict[int, Any] = {}  # test index -> outcome of its run or planned call, made ahead in a batch
        with self.executor.session(program, limits=self._session_limits(len(tests))) as session:
            stop = False
            for index, test in enumerate(tests):
                if stop:
                    results.append(_test_result(index=index, kind=test.kind, status="not_run", input=test.input))
                    continue
                if planned[index] is not None and index not in made:
                    # This test and the following ones with planned calls: one request, the calls in test
                    # order as the tests would make them one by one.
                    end = index
                    while end < len(tests) and planned[end] is not None:
                        end += 1
                    # When these are the program's last calls, the worker ends it in the same request.
                    outcomes = session.call_many(target, planned[index:end], timeout_s=self.time_limit_s,
                                                 last=end == len(tests))
                    made.update(zip(range(index, end), outcomes))
                if test.kind == "stdin" and index not in made:
                    # This stdin test and the ones right after it: one request, each run a fresh process.
                    end = index
                    while end < len(tests) and tests[end].kind == "stdin" and (end == index or not self.stop_at_first_failure):
                        end += 1
                    stop_after = {"time_limit", "memory_limit"} if self.stop_after_time_limit else set()
                    outcomes = session.run_stdin_many([t.input.encode("utf-8") for t in tests[index:end]],
                                                      timeout_s=self.time_limit_s, stop_after=stop_after)
                    made.update(zip(range(index, end), outcomes))
                if test.kind == "stdin":
                    result = self._stdin_test(index, test, made.pop(index))
                elif test.kind == "functional":
                    result = self._functional_test(index, test, made.pop(index))
                elif test.kind == "check":
                    result = self._check_test(session, index, test, problem, target,
                                              (planned[index], made.pop(index)) if index in made else None)
                else:
                    raise ProblemError(f"problem {problem.id}: unknown test kind {test.kind!r}")
                results.append(result)
                stop = (self.stop_at_first_failure and result.status != "passed") or (
                    self.stop_after_time_limit and result.status in ("time_limit", "memory_limit"))
        return self.verdict_from_results(results)

    @staticmethod
    def _planned_calls(problem: Problem, tests: Sequence[ProblemTest]) -> list[list[Any] | None]:
        """Per test, the arguments of its one call when known before it runs (functional tests; check tests of
        the shape `planned_call_args` accepts), else None."""
        names = frozenset({"candidate", problem.func_name or "candidate"})
        return [functional_args(t) if t.kind == "functional" else
                planned_call_args(t.input, names) if t.kind == "check" else None for t in tests]

    def _session_limits(self, n_tests: int) -> Any:
        """The executor's limits with the wall-clock and CPU budgets of one session (its calls share one budget)
        scaled to the tests, so a program is only limited per run or call by `time_limit_s`."""
        limits = getattr(self.executor, "limits", None)
        if limits is None:
            return None
        return _session_budget(limits, self.time_limit_s, n_tests)

    @staticmethod
    def verdict_from_results(results: Sequence[TestResult]) -> Verdict:
        """The verdict and feedback of a response from its per-test results (pure)."""
        n_passed = sum(r.status == "passed" for r in results)
        statuses = {r.status for r in results}
        name = next((s for s in FAILURE_ORDER if s in statuses), "accepted")
        if name == "accepted" and n_passed < len(results):
            name = "wrong_answer"  # only not-run tests left: cannot happen without a failure, kept for safety
        return Verdict(verdict=name, passed=name == "accepted", tests_passed=n_passed, tests_total=len(results),
                       feedback=render_feedback(results), tests=list(results))

    # -- one test of each kind

    def _stdin_test(self, index: int, test: ProblemTest, outcome: Any) -> TestResult:
        stdout, utf8 = _decode(outcome.stdout)
        stderr, _ = _decode(outcome.stderr)
        base = dict(index=index, kind="stdin", input=test.input, expected=test.output.strip(), stderr=stderr,
                    wall_s=outcome.wall_s)
        status = outcome.status
        if status == "ok" and outcome.exit_code not in (0, None):
            return _test_result(**base, status="runtime_error", output=stdout,
                              error=outcome.error or f"the program exited with code {outcome.exit_code}")
        if status != "ok":
            return _test_result(**base, status=status, output=stdout, error=outcome.error)
        if not utf8:
            return _test_result(**base, status="wrong_answer", output=stdout,
                              error="(the output is not valid UTF-8)")
        ok = stdout_matches(stdout, test.output, float_tolerance=self.float_tolerance)
        return _test_result(**base, status="passed" if ok else "wrong_answer", output=stdout.strip())

    def _functional_test(self, index: int, test: ProblemTest, outcome: Any) -> TestResult:
        expected = json.loads(test.output)
        stderr, _ = _decode(outcome.stderr)
        base = dict(index=index, kind="functional", input=test.input.strip(), expected=show_value(expected),
                    stderr=stderr, wall_s=outcome.wall_s)
        if outcome.status != "ok":
            return _test_result(**base, status=outcome.status, error=outcome.error)
        ok = values_equal(outcome.value, expected, float_tolerance=self.float_tolerance)
        return _test_result(**base, status="passed" if ok else "wrong_answer", output=show_value(outcome.value))

    def _check_test(self, session: Any, index: int, test: ProblemTest, problem: Problem, target: str,
                    made: tuple[list[Any], Any] | None) -> TestResult:
        """``made``: (arguments, outcome) of this test's planned call, made ahead; used when the test's call has
        exactly those arguments (as plain data, types included), else the calls are made live, all in one
        process of the program that ends with the test (``Session.shared_limit``)."""
        shared: list[Any] = []  # the test's shared limit, opened by its first live call
        with contextlib.ExitStack() as stack:
            def live_call(args: list[Any]) -> Any:
                if not shared:
                    shared.append(stack.enter_context(session.shared_limit(timeout_s=self.time_limit_s)))
                return shared[0].call(target, args)

            result = self._check_test_calls(index, test, problem, target, made, live_call)
        if shared and shared[0].end_status is not None and result.status in ("passed", "wrong_answer"):
            # Its processes spent more than the test's limit in all, what they spent after its last call included.
            failure = shared[0].end_status
            result = result.model_copy(update={"status": failure.status, "error": failure.error, "output": None,
                                                "expected": None})
        return result

    def _check_test_calls(self, index: int, test: ProblemTest, problem: Problem, target: str,
                          made: tuple[list[Any], Any] | None, live_call: Any) -> TestResult:
        calls: list[tuple[list[Any], Any]] = []  # (arguments, returned value) of each call, in order
        stderr_parts: list[str] = []
        wall = 0.0
        shown_name = problem.func_name or target

        def candidate(*args: Any, **kwargs: Any) -> Any:
            nonlocal wall
            if kwargs:
                raise ProblemError(f"problem {problem.id}: check tests may call candidate with positional arguments only")
            left = self.time_limit_s - wall  # one check test's calls share one time limit
            if left <= 0:
                calls.append((list(args), None))
                raise _CallFailed(_TimeUp)
            if made is not None and not calls and same_plain_data(list(args), made[0]):
                outcome = made[1]
            else:
                outcome = live_call(list(args))
            wall += outcome.wall_s
            stderr_parts.append(_decode(outcome.stderr)[0])
            calls.append((list(args), outcome.value if outcome.status == "ok" else None))
            if outcome.status != "ok":
                raise _CallFailed(outcome)
            return outcome.value

        namespace: dict[str, Any] = {"__name__": "check"}
        if problem.check_setup:
            exec(trusted_code(problem.check_setup, "<check_setup>"), namespace)
        namespace["candidate"] = candidate
        if problem.func_name and "." not in problem.func_name:
            # Some HumanEval checks name the entry point itself (HumanEval/33 calls sort_third): the original
            # harness runs them in the program's namespace, so that name is the program's function too.
            namespace[problem.func_name] = candidate
        status, error = "passed", None
        try:
            exec(trusted_code(test.input, "<check>"), namespace)
        except _CallFailed as failed:
            status, error = failed.outcome.status, failed.outcome.error
        except ProblemError:
            raise
        except AssertionError as err:
            status, error = "wrong_answer", (f"AssertionError: {err}" if str(err) else None)
        except Exception as err:
            if not calls:
                raise ProblemError(
                    f"problem {problem.id}: check test {index + 1} fails before calling candidate: "
                    f"{type(err).__name__}: {err}") from None
            # The test code choked on what the program returned (e.g. arithmetic on None): a wrong answer.
            status, error = "wrong_answer", f"the test raised {type(err).__name__}: {err}"
        last_args, last_value = calls[-1] if calls else ([], None)
        shown_input = call_text(shown_name, last_args) if calls else test.input.strip()
        expected = expected_of_assert(test.input, namespace) if status == "wrong_answer" else None
        if status == "wrong_answer" and expected is None:
            expected = test.input.strip()  # the assertion itself says what was expected
        return _test_result(
            index=index, kind="check", status=status, input=shown_input,
            output=safe_repr(last_value) if calls and status in ("passed", "wrong_answer") else None,
            expected=expected, error=error, stderr="".join(stderr_parts), wall_s=wall)

    # -- many responses

    def grade_many(self, items: Sequence[GradeRequest | tuple], *, progress: bool = False) -> list[Verdict]:
        """Grade many responses on `n_threads` threads (each holds one executor session at a time), in order.

        Every problem is validated first, so a malformed problem raises ProblemError before anything runs.
        """
        requests = validated_requests(items)
        verdicts: list[Verdict | None] = [None] * len(requests)
        if not requests:
            return []
        lock = threading.Lock()
        bar = _progress_bar(len(requests)) if progress else None

        def work(i: int) -> None:
            req = requests[i]
            tests = list(req.problem.tests if req.tests is None else req.tests)
            verdicts[i] = self._grade_valid(req.problem, req.response, tests, req.truncated)
            if bar is not None:
                with lock:
                    bar[0].advance(bar[1])

        try:
            if bar is not None:
                bar[0].start()
            with ThreadPoolExecutor(max_workers=min(self.n_threads, len(requests))) as pool:
                for future in [pool.submit(work, i) for i in range(len(requests))]:
                    future.result()
        finally:
            if bar is not None:
                bar[0].stop()
        return [v for v in verdicts if v is not None]


def _progress_bar(total: int) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("grading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=False)
    return progress, progress.add_task("grading", total=total)
