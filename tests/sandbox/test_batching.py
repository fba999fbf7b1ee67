"""Work sent in batches: ``Session.call_many`` against one call at a time, ``Session.run_stdin_many`` against
one run at a time, each program's own limits and fresh process whatever ran before in the same worker, the
check tests whose call is known ahead (``planned_call_args``) and the grader's batched grading on a real
executor."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from sandbox.executor import Executor, Limits
from sandbox.grader import Grader, planned_call_args
from sandbox.problems import Problem, ProblemError, ProblemTest
from tests.sandbox import executor_hostile_programs as H

LIMITS = Limits(wall_s=10, cpu_s=10, memory_mb=512)


@pytest.fixture(scope="module")
def ex():
    # One worker: every session of this module runs in the same fork server, one program after another.
    with Executor(1, isolation="auto", limits=LIMITS) as executor:
        yield executor


def run(ex, code, stdin=b"", timeout_s=5.0, limits=None):
    with ex.session(code, limits=limits) as s:
        return s.run_stdin(stdin, timeout_s=timeout_s)


def summary(outcomes):
    return [(o.status, o.value, o.stdout, o.stderr, o.error) for o in outcomes]


# ------------------------------------------------------------------------------------------ Session.call_many
ECHO = (
    "import sys\n"
    "print('loaded')\n"
    "def f(x):\n"
    "    print('out', x)\n"
    "    sys.stderr.write('err %s\\n' % (x,))\n"
    "    return x * 10\n"
)


def test_call_many_returns_each_call_in_order_with_its_own_output(ex):
    with ex.session(ECHO) as s:
        outs = s.call_many("f", [[1], [2], [3]], timeout_s=5)
    assert [(o.status, o.value) for o in outs] == [("ok", 10), ("ok", 20), ("ok", 30)]
    # Each call is a process of its own that runs the top-level code, then that call: its output is both.
    assert [o.stdout for o in outs] == [b"loaded\nout 1\n", b"loaded\nout 2\n", b"loaded\nout 3\n"]
    assert [o.stderr for o in outs] == [b"err 1\n", b"err 2\n", b"err 3\n"]
    assert all(o.error is None and o.wall_s > 0 for o in outs)


COUNTER = "n = 0\ndef inc():\n    global n\n    n += 1\n    return n\n"


def test_no_state_crosses_calls_in_a_batch_or_between_batches(ex):
    with ex.session(COUNTER) as s:
        first = s.call_many("inc", [[], [], []], timeout_s=5)
        single = s.call("inc", [], timeout_s=5)
        second = s.call_many("inc", [[], []], timeout_s=5)
    # Every call is the program's first: its own process, from the template.
    assert [o.value for o in first] == [1, 1, 1]
    assert (single.status, single.value) == ("ok", 1)
    assert [o.value for o in second] == [1, 1]


def test_an_exception_in_one_call_is_its_own_error_and_the_rest_still_run(ex):
    code = "seen = []\ndef f(x):\n    seen.append(x)\n    if x < 0:\n        raise ValueError('neg %d' % x)\n    return len(seen)\n"
    with ex.session(code) as s:
        outs = s.call_many("f", [[1], [-2], [3]], timeout_s=5)
        after = s.call("f", [4], timeout_s=5)
    assert [o.status for o in outs] == ["ok", "runtime_error", "ok"]
    assert outs[1].error.endswith("ValueError: neg -2\n") and outs[1].value is None
    assert (outs[0].value, outs[2].value, after.value) == (1, 1, 1)  # each call sees its own argument only


SLOW = (
    "def f(x):\n"
    "    print('ran', x, flush=True)\n"
    "    while x == 'loop':\n"
    "        pass\n"
    "    return x\n"
)


def test_a_time_limit_ends_the_program_for_the_rest_of_the_batch_and_the_session(ex):
    with ex.session(SLOW) as s:
        outs = s.call_many("f", [["a"], ["loop"], ["b"], ["c"]], timeout_s=0.3)
        later = s.call("f", ["d"], timeout_s=5)
        later_many = s.call_many("f", [["e"], ["f"]], timeout_s=5)
    assert [o.status for o in outs] == ["ok", "time_limit", "time_limit", "time_limit"]
    assert outs[0].value == "a" and outs[0].stdout == b"ran a\n"
    assert 0.3 <= outs[1].wall_s < 5 and outs[1].stdout == b"ran loop\n"
    # The calls after the limit did not run: no output, no time, the same failure.
    for o in outs[2:] + [later] + later_many:
        assert (o.status, o.value, o.stdout, o.stderr, o.wall_s, o.error) == (
            "time_limit", None, b"", b"", 0.0, outs[1].error)


def test_an_exit_in_one_call_ends_the_session(ex):
    code = "import sys\ndef f(x):\n    print('ran', x)\n    if x == 'exit':\n        sys.exit(4)\n    return x\n"
    with ex.session(code) as s:
        outs = s.call_many("f", [["a"], ["exit"], ["b"]], timeout_s=5)
        later = s.call("f", ["c"], timeout_s=5)
    assert [o.status for o in outs] == ["ok", "runtime_error", "runtime_error"]
    assert outs[1].stdout == b"ran exit\n" and "exited (code 4)" in outs[1].error
    for o in (outs[2], later):
        assert (o.status, o.stdout, o.wall_s, o.error) == ("runtime_error", b"", 0.0, outs[1].error)


STATEFUL = (
    "import sys\n"
    "hist = []\n"
    "def f(x):\n"
    "    hist.append(x)\n"
    "    print('call', len(hist))\n"
    "    if x % 3 == 0:\n"
    "        raise KeyError(len(hist))\n"
    "    if x == 8:\n"
    "        sys.exit(2)\n"
    "    return (sum(hist), list(hist))\n"
)


def test_call_many_is_the_same_as_calling_one_by_one(ex):
    args = [[x] for x in (1, 2, 3, 4, 6, 5, 8, 7, 1)]
    with ex.session(STATEFUL) as s:
        batched = s.call_many("f", args, timeout_s=5)
    with ex.session(STATEFUL) as s:
        single = [s.call("f", a, timeout_s=5) for a in args]
    assert summary(batched) == summary(single)
    # Independent expectations: errors at 3 and 6 keep the session, the exit at 8 ends it; every call that ran
    # started from a fresh program (its history holds its own argument only).
    assert [o.status for o in batched] == ["ok", "ok", "runtime_error", "ok", "runtime_error", "ok",
                                           "runtime_error", "runtime_error", "runtime_error"]
    assert batched[5].value == (5, [5])
    assert [o.stdout for o in batched] == [b"call 1\n"] * 7 + [b""] * 2


def test_empty_batch_starts_nothing_and_bad_requests_raise_before_running(ex):
    with ex.session(ECHO) as s:
        assert s.call_many("f", [], timeout_s=5) == []
        with pytest.raises(ValueError, match="plain data"):
            s.call_many("f", [[1], [object()]], timeout_s=5)
        for target in ("a.b.c", "1f", "f()", "", "f; g"):
            with pytest.raises(ValueError, match="call target"):
                s.call_many(target, [[1]], timeout_s=5)
        first = s.call("f", [5], timeout_s=5)
    # Nothing ran before this call: the top-level code's output comes with it.
    assert (first.status, first.value, first.stdout) == ("ok", 50, b"loaded\nout 5\n")


# ------------------------------------------------------------------------- one program after another
LIMITS_PROBE = (
    "import resource\n"
    "def lims():\n"
    "    return (resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, resource.getrlimit(resource.RLIMIT_FSIZE)[0])\n"
    "if __name__ == '__main__':\n"
    "    print(*lims())\n"
)


def test_each_program_gets_its_own_limits_whatever_ran_before(ex):
    a = Limits(wall_s=10, cpu_s=10, memory_mb=256, file_bytes=1000)
    b = Limits(wall_s=10, cpu_s=10, memory_mb=512, file_bytes=5000)
    c = Limits(wall_s=10, cpu_s=10, memory_mb=256, file_bytes=5000)  # differs from a in file_bytes only
    expected = {a: b"256 1000\n", b: b"512 5000\n", c: b"256 5000\n"}
    seen = []
    for limits in (a, b, a, a, c, a, b, b):
        out = run(ex, LIMITS_PROBE, limits=limits)
        assert out.status == "ok", out
        seen.append(out.stdout == expected[limits])
    assert all(seen), seen
    # Call sessions too.
    for limits in (b, a, c, a):
        with ex.session(LIMITS_PROBE, limits=limits) as s:
            got = s.call("lims", [], timeout_s=5)
        assert (got.status, got.value) == ("ok", (limits.memory_mb, limits.file_bytes))


FILES = (
    "import hashlib, sys\n"
    "data = sys.stdin.buffer.read()\n"
    "print(len(data), hashlib.sha256(data).hexdigest())\n"
    "with open('small', 'wb') as f:\n"
    "    f.write(b'x' * 1000)\n"
    "try:\n"
    "    with open('big', 'wb') as f:\n"
    "        f.write(b'x' * 50000)\n"
    "    print('written')\n"
    "except OSError as e:\n"
    "    print('blocked', e.errno)\n"
)


def test_stdin_beyond_a_pipe_buffer_arrives_whole_and_the_file_limit_holds(ex):
    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest().encode()
    limits = Limits(wall_s=10, cpu_s=10, memory_mb=512, file_bytes=1000)
    for _ in range(2):
        out = run(ex, FILES, data, limits=limits)
        assert out.status == "ok", out
        assert out.stdout == b"%d %s\nblocked 27\n" % (len(data), digest)  # EFBIG
    roomy = run(ex, FILES, b"abc", limits=limits.model_copy(update={"file_bytes": 100_000}))
    assert roomy.stdout == b"3 %s\nwritten\n" % hashlib.sha256(b"abc").hexdigest().encode()


FRESH = (  # a session's program is __main__ too: the run's print comes from its stdin
    "import builtins, json, os, sys\n"
    "def check():\n"
    "    fresh = not os.path.exists('marker') and not hasattr(builtins, 'leak') and not hasattr(json, 'leak')\n"
    "    fresh = fresh and 'leak' not in globals()\n"
    "    with open('marker', 'w') as f:\n"
    "        f.write('x')\n"
    "    builtins.leak = json.leak = 1\n"
    "    globals()['leak'] = 1\n"
    "    return fresh, os.getpid()\n"
    "if sys.stdin.read() == 'run':\n"
    "    print(*check())\n"
)


def test_every_program_is_a_fresh_process(ex):
    pid_ns = ex.isolation_report()["pid_namespace"]
    results = []
    for i in range(30):
        if i % 2:
            with ex.session(FRESH) as s:
                got = s.call("check", [], timeout_s=5)
                again = s.call("check", [], timeout_s=5)  # the same program, a fresh process again
            assert got.status == again.status == "ok"
            assert again.value[0] is True
            results.append(tuple(got.value))
        else:
            out = run(ex, FRESH, b"run")
            assert out.status == "ok", out
            fresh, pid = out.stdout.split()
            results.append((fresh == b"True", int(pid)))
    assert all(fresh for fresh, _ in results), results
    if pid_ns:  # a run is PID 1 of its namespace; a call, the first child of its session's process there
        assert [pid for _, pid in results] == [1, 2] * 15


# ------------------------------------------------------------------------------------------- planned calls
NAMES = frozenset({"candidate"})


@pytest.mark.parametrize("code, names, expected", [
    ("assert candidate([1, 2], 3) == 5", NAMES, [[1, 2], 3]),
    ("assert abs(candidate(1.5) - 2.0) < 1e-6", NAMES, [1.5]),
    ("assert sorted(candidate([3,1])) == [1,3]", NAMES, [[3, 1]]),
    ("assert candidate('a', (1, 2), {'k': None}, -3) == 1\n", NAMES, ["a", (1, 2), {"k": None}, -3]),
    ("assert candidate() is None", NAMES, []),
    ("assert not candidate(0)", NAMES, [0]),
    ("assert candidate(1) == 2, 'message'", NAMES, [1]),
    ("assert f(2) == 4", frozenset({"candidate", "f"}), [2]),
    ("assert candidate(x) == 1", NAMES, None),                       # not a literal
    ("assert candidate(1) == candidate(2)", NAMES, None),            # two calls
    ("assert candidate(1) == 2, candidate(3)", NAMES, None),         # two calls (one in the message)
    ("assert flag and candidate(1)", NAMES, None),                   # conditional call
    ("assert candidate(1) if flag else True", NAMES, None),          # conditional call
    ("assert 0 < x < candidate(1)", NAMES, None),                    # after a comparison that may stop
    ("assert all(candidate(i) for i in [1])", NAMES, None),          # lazy
    ("assert helper(candidate(1))", NAMES, None),                    # a call of something not builtin
    ("assert math.isclose(candidate(1), 1)", NAMES, None),           # a call of something not builtin
    ("assert candidate(1).count(2) == 1", NAMES, None),              # a method call on the result
    ("for i in range(3): assert candidate(i)", NAMES, None),         # not a single assert
    ("x = 1\nassert candidate(1)", NAMES, None),                     # two statements
    ("assert candidate(*[1])", NAMES, None),                         # starred
    ("assert candidate(1, k=2)", NAMES, None),                       # keyword
    ("assert candidate(**{'k': 2})", NAMES, None),                   # keywords
    ("assert f(2) == 4", NAMES, None),                               # not a name of the program
    ("assert candidate(1", NAMES, None),                             # does not parse
])
def test_planned_call_args(code, names, expected):
    assert planned_call_args(code, names) == expected


# ------------------------------------------------------------------------------------------ batched grading
def test_functional_tests_each_call_a_fresh_program_with_their_own_arguments(ex):
    problem = Problem(id="count", prompt="", func_name="count", tests=[
        ProblemTest(kind="functional", input=f'"{tag}"', output=f'[1, "{tag}"]') for tag in "abcde"])
    program = "calls = []\ndef count(tag):\n    calls.append(tag)\n    return [len(calls), calls[-1]]\n"
    verdict = Grader(ex, time_limit_s=2).grade_program(problem, program)
    assert verdict.verdict == "accepted", verdict.feedback
    assert [t.status for t in verdict.tests] == ["passed"] * 5
    method = "class Solution:\n    n = 0\n    def count(self, tag):\n        Solution.n += 1\n        return [Solution.n, tag]\n"
    assert Grader(ex, time_limit_s=2).grade_program(problem, method).verdict == "accepted"


STATEFUL_CHECK = Problem(id="next", prompt="", func_name="nxt", tests=[
    ProblemTest(kind="check", input="assert candidate('a') == (1, 'a')"),
    ProblemTest(kind="check", input="assert nxt('b') == (1, 'b')"),
    # live: the test's calls, one after another in one process of the program, share its state
    ProblemTest(kind="check", input="for i, tag in enumerate(['c', 'cc', 'ccc']):\n    assert candidate(tag) == (i + 1, tag)"),
    ProblemTest(kind="check", input="assert candidate('d') == (1, 'd')"),
    ProblemTest(kind="check", input="assert candidate('e')[0] == 1"),
    ProblemTest(kind="check", input="x = 'f'\nassert candidate(x) == (1, x)"),  # live, one call
])
NXT = "n = 0\ndef nxt(tag):\n    global n\n    n += 1\n    return (n, tag)\n"


def test_check_tests_planned_and_live_call_a_fresh_program_each(ex):
    verdict = Grader(ex, time_limit_s=2).grade_program(STATEFUL_CHECK, NXT)
    assert verdict.verdict == "accepted", verdict.feedback
    assert verdict.tests_passed == 6


DOUBLE = Problem(id="double", prompt="", func_name="double", tests=[
    ProblemTest(kind="check", input="assert candidate(1) == 2"),
    ProblemTest(kind="check", input="assert candidate(3) == 6"),
    ProblemTest(kind="check", input="for i in (4, 5):\n    assert candidate(i) == 2 * i"),
    ProblemTest(kind="check", input="assert abs(candidate(2.5) - 5.0) < 1e-9"),
    ProblemTest(kind="check", input="assert candidate(10) == 20"),
])


def test_check_tests_mixing_planned_and_live_calls_report_each_test(ex):
    program = "def double(x):\n    return 7 if x == 3 else 2 * x\n"
    verdict = Grader(ex, time_limit_s=2).grade_program(DOUBLE, program)
    assert [t.status for t in verdict.tests] == ["passed", "wrong_answer", "passed", "passed", "passed"]
    wrong = verdict.tests[1]
    assert (wrong.input, wrong.output, wrong.expected) == ("double(3)", "7", "6")
    assert verdict.verdict == "wrong_answer" and "double(3)" in verdict.feedback
    assert [t.input for t in verdict.tests] == ["double(1)", "double(3)", "double(5)", "double(2.5)", "double(10)"]


def test_a_time_limit_in_a_batch_stops_the_tests_after_it(ex):
    problem = DOUBLE.model_copy(update={"tests": [
        ProblemTest(kind="check", input="assert candidate(1) == 2"),
        ProblemTest(kind="check", input="assert candidate(-1) == -2"),
        ProblemTest(kind="check", input="assert candidate(2) == 4"),
        ProblemTest(kind="check", input="assert candidate(3) == 6"),
    ]})
    program = "def double(x):\n    while x < 0:\n        pass\n    return 2 * x\n"
    verdict = Grader(ex, time_limit_s=0.4, stop_after_time_limit=True).grade_program(problem, program)
    assert [t.status for t in verdict.tests] == ["passed", "time_limit", "not_run", "not_run"]
    assert verdict.verdict == "time_limit" and verdict.tests[1].wall_s >= 0.4
    functional = Problem(id="f", prompt="", func_name="double", tests=[
        ProblemTest(kind="functional", input=str(x), output=str(2 * x)) for x in (1, -1, 2, 3)])
    verdict = Grader(ex, time_limit_s=0.4, stop_after_time_limit=True).grade_program(functional, program)
    assert [t.status for t in verdict.tests] == ["passed", "time_limit", "not_run", "not_run"]


CHECK_LOOPS = Problem(id="loops", prompt="", func_name="double", tests=[
    ProblemTest(kind="check", input="for i in (1, 2, 3):\n    assert candidate(i) == 2 * i"),
    ProblemTest(kind="check", input="for i in (4, 5, 6):\n    assert candidate(i) == 2 * i"),
    ProblemTest(kind="check", input="for i in (7, 8, 9):\n    assert candidate(i) == 2 * i"),
    ProblemTest(kind="check", input="for i in (10, -1, 11):\n    assert candidate(i) == 2 * i"),
])
LOOPS_PROGRAM = (
    "import sys\n"
    "def double(x):\n"
    "    sys.stderr.write('x=%d\\n' % x)\n"
    "    if x == 5:\n"
    "        return 11\n"
    "    if x == 8:\n"
    "        raise KeyError(x)\n"
    "    while x < 0:\n"
    "        pass\n"
    "    return 2 * x\n"
)


def test_which_call_of_a_check_test_failed_and_its_feedback(ex):
    # The calls of a test share one process; what each test reports is what it reported when every call was a
    # process of its own: the call that failed, its value or error, the standard error of the test's calls.
    verdict = Grader(ex, time_limit_s=0.5, stop_after_time_limit=False).grade_program(CHECK_LOOPS, LOOPS_PROGRAM)
    got = [(t.status, t.input, t.output, t.expected, t.error, t.stderr) for t in verdict.tests]
    assert got == [
        ("passed", "double(3)", "6", None, None, "x=1\nx=2\nx=3\n"),
        ("wrong_answer", "double(5)", "11", CHECK_LOOPS.tests[1].input, None, "x=4\nx=5\n"),
        ("runtime_error", "double(8)", None, None,
         'Traceback (most recent call last):\n  File "<solution>", line 7, in double\n    raise KeyError(x)\n'
         "KeyError: 8\n", "x=7\nx=8\n"),
        ("time_limit", "double(-1)", None, None, None, "x=10\nx=-1\n"),
    ]
    assert verdict.verdict == "runtime_error" and verdict.feedback.startswith("Runtime Error")


def test_a_planned_argument_that_is_not_plain_data_is_a_problem_error(ex):
    # As when the test calls the program itself: the problem, not the program, is at fault.
    problem = DOUBLE.model_copy(update={"tests": [ProblemTest(kind="check", input="assert candidate(1j) == 2j")]})
    with pytest.raises(ProblemError):
        Grader(ex, time_limit_s=2).grade_program(problem, "def double(x):\n    return 2 * x\n")


# ----------------------------------------------------------------------------------- Session.run_stdin_many
def run_many(ex, code, stdins, timeout_s=5.0, limits=None, stop_after=frozenset()):
    with ex.session(code, limits=limits) as s:
        return s.run_stdin_many(stdins, timeout_s=timeout_s, stop_after=stop_after)


def run_each(ex, code, stdins, timeout_s=5.0, limits=None):
    return [run(ex, code, stdin, timeout_s=timeout_s, limits=limits) for stdin in stdins]


processes_named = H.processes_named


def run_summary(outcomes):
    return [(o.status, o.exit_code, o.stdout, o.stderr) for o in outcomes]


ECHO_RUN = (  # stdin: "<exit code> <word>"; the word "raise" raises
    "import sys\n"
    "code, word = sys.stdin.read().split()\n"
    "print('out', word)\n"
    "sys.stderr.write('err %s\\n' % word)\n"
    "def fail(w):\n"
    "    raise ValueError('bad ' + w)\n"
    "if word == 'raise':\n"
    "    fail(word)\n"
    "sys.exit(int(code))\n"
)


def test_run_stdin_many_returns_each_run_in_order_with_its_own_output(ex):
    outs = run_many(ex, ECHO_RUN, [b"0 a", b"0 raise", b"3 c", b"0 d"])
    assert [(o.status, o.exit_code) for o in outs] == [("ok", 0), ("runtime_error", 1), ("runtime_error", 3), ("ok", 0)]
    assert [o.stdout for o in outs] == [b"out a\n", b"out raise\n", b"out c\n", b"out d\n"]
    assert [o.stderr for o in outs] == [b"err a\n", b"err raise\n", b"err c\n", b"err d\n"]
    error = outs[1].error
    assert error.startswith("Traceback") and error.endswith("ValueError: bad raise\n")
    assert 'File "<solution>"' in error and "in fail" in error
    assert outs[2].error == "the program exited with code 3"
    assert outs[0].error is None and outs[3].error is None and all(o.wall_s > 0 for o in outs)
    assert run_many(ex, ECHO_RUN, []) == []


MIXED = (
    "import sys\n"
    "data = sys.stdin.read()\n"
    "n = int(data) if data.strip().lstrip('-').isdigit() else None\n"
    "if n is None:\n"
    "    print('not a number', repr(data))\n"
    "    sys.exit(2)\n"
    "print(n * n)\n"
    "if n % 3 == 0:\n"
    "    sys.stderr.write('multiple of three\\n')\n"
    "if n < 0:\n"
    "    raise ArithmeticError(n)\n"
    "if n == 7:\n"
    "    sys.exit('seven')\n"
)


def test_run_stdin_many_is_the_same_as_running_one_by_one(ex):
    stdins = [b"1", b"3", b"x y", b"-4", b"7", b"", b"6\n", b"-3", b"2"]
    batched = run_many(ex, MIXED, stdins)
    single = run_each(ex, MIXED, stdins)
    assert run_summary(batched) == run_summary(single)
    assert [o.error for o in batched] == [o.error for o in single]
    # Independent expectations.
    assert [(o.status, o.exit_code) for o in batched] == [
        ("ok", 0), ("ok", 0), ("runtime_error", 2), ("runtime_error", 1), ("runtime_error", 1),
        ("runtime_error", 2), ("ok", 0), ("runtime_error", 1), ("ok", 0)]
    assert batched[1].stderr == b"multiple of three\n" and batched[1].stdout == b"9\n"
    assert batched[4].stderr == b"seven\n" and batched[5].stdout == b"not a number ''\n"
    assert batched[7].stderr == b"multiple of three\n" and batched[7].error.endswith("ArithmeticError: -3\n")


FRESH_RUN = (
    "import builtins, json, os, sys\n"
    "tag = sys.stdin.read()\n"
    "seen = (sorted(os.listdir('.')), os.environ.get('LEAK'), hasattr(json, 'leak'), hasattr(builtins, 'leak'),\n"
    "        'leak' in sys.modules, os.getcwd(), os.getpid())\n"
    "print(repr(seen))\n"
    "with open('file-' + tag, 'w') as f:\n"
    "    f.write(tag)\n"
    "os.makedirs('dir/sub')\n"
    "open('dir/sub/deep', 'w').write(tag)\n"
    "open('.hidden', 'w').write(tag)\n"
    "os.environ['LEAK'] = tag\n"
    "os.putenv('LEAK2', tag)\n"
    "json.leak = builtins.leak = 1\n"
    "sys.modules['leak'] = json\n"
    "os.chdir('dir')\n"
)


def test_each_run_of_a_batch_is_a_fresh_process_in_an_empty_scratch_dir(ex):
    outs = run_many(ex, FRESH_RUN, [b"a", b"b", b"c"])
    assert [o.status for o in outs] == ["ok"] * 3, outs
    seen = [eval(o.stdout) for o in outs]  # our own repr
    cwd = seen[0][5]
    for listing, env, json_leak, builtins_leak, module_leak, here, _ in seen:
        assert (listing, env, json_leak, builtins_leak, module_leak, here) == ([], None, False, False, False, cwd)
    if ex.isolation_report()["pid_namespace"]:  # a process of its own per run: PID 1 of its own namespace
        assert {s[6] for s in seen} == {1}
    lone = [eval(o.stdout) for o in run_each(ex, FRESH_RUN, [b"a", b"b"])]
    assert [s[:6] for s in lone] == [s[:6] for s in seen[:2]]


LOCKED_DIR = (  # leaves what its own user cannot list or remove
    "import os, sys\n"
    "print(sorted(os.listdir('.')))\n"
    "if sys.stdin.read() == 'lock':\n"
    "    os.makedirs('locked/inner')\n"
    "    open('locked/inner/f', 'w').write('x')\n"
    "    os.chmod('locked', 0)\n"
)


def test_a_directory_the_program_locked_does_not_reach_the_next_run(ex):
    outs = run_many(ex, LOCKED_DIR, [b"lock", b"look"])
    assert [(o.status, o.stdout) for o in outs] == [("ok", b"[]\n"), ("ok", b"[]\n")]


LOCKED_CWD = "import os, sys\nprint(sorted(os.listdir('.')))\nif sys.stdin.read() == 'lock':\n    open('f', 'w').write('x')\n    os.chmod('.', 0)\n"


def test_a_scratch_dir_the_program_locked_is_not_the_next_runs_problem(ex):
    outs = run_many(ex, LOCKED_CWD, [b"lock", b"look", b"look"])
    assert [(o.status, o.exit_code, o.stdout, o.stderr) for o in outs] == [("ok", 0, b"[]\n", b"")] * 3, outs


ORPHANS = (  # "<marker>": leave an orphan named so (and see it alive); "check <markers>": look for them
    "import os, sys, time\n"
    "def named():\n"
    "    names = []\n"
    "    for p in os.listdir('/proc'):\n"
    "        try:\n"
    "            names.append(open('/proc/%s/comm' % p).read().strip())\n"
    "        except OSError:\n"
    "            pass\n"
    "    return names\n"
    "arg = sys.stdin.read().split()\n"
    "if arg[0] == 'check':\n"
    "    print(sorted(n for n in named() if n in arg[1:]), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
    "else:\n"
    "    ns = {'__name__': 'orphan'}\n"
    "    exec(ORPHAN, ns)\n"
    "    ns['orphan'](arg[0])\n"
    "    deadline = time.monotonic() + 5\n"
    "    while arg[0] not in named() and time.monotonic() < deadline:\n"
    "        time.sleep(0.01)\n"
    "    print('alive' if arg[0] in named() else 'not seen')\n"
).replace("exec(ORPHAN, ns)", "exec(%r, ns)" % H.ORPHAN)


def test_orphans_of_a_run_die_before_the_next_run(ex):
    m1, m2 = ("orph" + uuid.uuid4().hex[:8] for _ in range(2))
    stdins = [m1.encode(), b"check " + m1.encode(), m2.encode(), ("check %s %s" % (m1, m2)).encode()]
    outs = run_many(ex, ORPHANS, stdins)
    assert [o.status for o in outs] == ["ok"] * 4, outs
    assert outs[0].stdout == outs[2].stdout == b"alive\n"  # the checks can see an orphan
    assert outs[1].stdout.startswith(b"[] ") and outs[3].stdout.startswith(b"[] "), outs
    report = ex.isolation_report()
    if report["pid_namespace"] and report["bwrap"]:  # its own /proc: only the checking run
        assert outs[1].stdout == outs[3].stdout == b"[] 1\n"
    assert processes_named(m1) == processes_named(m2) == []


LOOPS = "import sys\ns = sys.stdin.read()\nprint('start', s, flush=True)\nwhile s == 'loop':\n    pass\nprint('end', s)\n"


def test_a_time_limit_in_the_middle_of_a_batch_is_that_runs_only(ex):
    outs = run_many(ex, LOOPS, [b"a", b"loop", b"c"], timeout_s=0.4)
    assert [(o.status, o.stdout) for o in outs] == [
        ("ok", b"start a\nend a\n"), ("time_limit", b"start loop\n"), ("ok", b"start c\nend c\n")]
    assert 0.4 <= outs[1].wall_s < 3 and outs[1].exit_code is None
    assert run_summary(outs) == run_summary(run_each(ex, LOOPS, [b"a", b"loop", b"c"], timeout_s=0.4))
    stopped = run_many(ex, LOOPS, [b"a", b"loop", b"c"], timeout_s=0.4, stop_after={"time_limit"})
    assert [(o.status, o.stdout) for o in stopped] == [("ok", b"start a\nend a\n"), ("time_limit", b"start loop\n")]
    # A status not listed does not stop the batch.
    kept = run_many(ex, LOOPS, [b"loop", b"b"], timeout_s=0.4, stop_after={"memory_limit", "runtime_error"})
    assert [o.status for o in kept] == ["time_limit", "ok"]


def test_an_output_limit_in_the_middle_of_a_batch_is_that_runs_only(ex):
    cap = 100_000
    code = "import sys\nif sys.stdin.read() == 'huge':\n" + "".join(
        "    " + line + "\n" for line in H.HUGE_OUTPUT.splitlines()) + "print('small')\n"
    outs = run_many(ex, code, [b"a", b"huge", b"b"], limits=Limits(output_bytes=cap))
    assert [o.status for o in outs] == ["ok", "output_limit", "ok"]
    assert outs[0].stdout == outs[2].stdout == b"small\n"
    assert 0 < len(outs[1].stdout) + len(outs[1].stderr) <= cap and set(outs[1].stdout) == set(b"x")


def test_forged_runner_frames_in_a_batch_are_that_runs_runtime_error(ex):
    stdins = [b"plain", b"garbage", b"plain", b"nested", b"plain", b"setup", b"plain"]
    outs = run_many(ex, H.FORGED_FRAMES, stdins)
    assert [o.status for o in outs] == ["ok", "runtime_error", "ok", "runtime_error", "ok", "runtime_error", "ok"]
    assert [o.stdout for o in outs[::2]] == [b"done\n"] * 4
    assert [o.status for o in run_each(ex, H.FORGED_FRAMES, stdins[1:6:2])] == ["runtime_error"] * 3
    assert run(ex, "print('fine')").stdout == b"fine\n"


KILL_PARENT_RUN = "import sys\nif sys.stdin.read() == 'kill':\n    exec(%r)\nelse:\n    print('plain')\n" % H.KILL_PARENT


def test_killing_its_parent_in_a_batch_leaves_the_other_runs_and_the_worker(ex):
    pids = [w.proc.pid for w in ex._pool._all]
    outs = run_many(ex, KILL_PARENT_RUN, [b"plain", b"kill", b"plain", b"kill", b"plain"])
    assert len(outs) == 5
    assert [(o.status, o.stdout) for o in outs[::2]] == [("ok", b"plain\n")] * 3
    assert [w.proc.pid for w in ex._pool._all] == pids and all(w.alive for w in ex._pool._all)
    assert run(ex, "print(6 * 7)").stdout == b"42\n"


def test_a_run_that_kills_its_own_group_is_pid_1_in_a_batch_too(ex):
    # Every run, alone or in a batch, is PID 1 of its namespace, immune to signals it sends itself.
    lone = run(ex, KILL_PARENT_RUN, b"kill")
    assert (lone.status, lone.stdout[-11:]) == ("ok", b"still here\n")
    outs = run_many(ex, KILL_PARENT_RUN, [b"plain", b"kill", b"plain"])
    assert [(o.status, o.stdout[-11:]) for o in outs] == [("ok", b"plain\n"), ("ok", b"still here\n"), ("ok", b"plain\n")]


def test_a_forked_memory_bomb_in_a_batch_is_that_runs_memory_limit(ex):
    if not ex.isolation_report()["cgroup"]:
        pytest.skip("no writable cgroup v1 memory hierarchy here")
    bomb = H.FORKED_MEMORY_BOMB.replace("time.sleep(5)", "time.sleep(1)")  # holds its memory for less long
    assert bomb != H.FORKED_MEMORY_BOMB
    code = "import sys\nif sys.stdin.read() == 'bomb':\n    exec(%r)\nelse:\n    print('fine')\n" % bomb
    fast = Limits(wall_s=10, cpu_s=10, memory_mb=512)
    outs = run_many(ex, code, [b"a", b"bomb", b"b"], timeout_s=8, limits=fast)
    assert [o.status for o in outs] == ["ok", "memory_limit", "ok"], outs
    assert outs[0].stdout == outs[2].stdout == b"fine\n"
    stopped = run_many(ex, code, [b"bomb", b"a"], timeout_s=8, limits=fast, stop_after={"memory_limit"})
    assert [o.status for o in stopped] == ["memory_limit"]


# --------------------------------------------------------------------------------- batched stdin grading
def stdin_problem(outputs):
    return Problem(id="sq", prompt="", tests=[
        ProblemTest(kind="stdin", input="%d\n" % n, output=out) for n, out in enumerate(outputs, 1)])


SQUARES = stdin_problem(["1", "4", "9", "16", "25"])
SQUARE = (
    "n = int(input())\n"
    "while n == LOOP:\n"
    "    pass\n"
    "if n == FAIL:\n"
    "    raise ValueError(n)\n"
    "print(n * n + (1 if n == WRONG else 0))\n"
)


def square(loop=0, fail=0, wrong=0):
    return SQUARE.replace("LOOP", str(loop)).replace("FAIL", str(fail)).replace("WRONG", str(wrong))


def test_stdin_tests_graded_in_a_batch_report_each_test(ex):
    verdict = Grader(ex, time_limit_s=2).grade_program(SQUARES, square())
    assert verdict.verdict == "accepted" and [t.output for t in verdict.tests] == ["1", "4", "9", "16", "25"]
    verdict = Grader(ex, time_limit_s=2).grade_program(SQUARES, square(wrong=3, fail=5))
    assert [t.status for t in verdict.tests] == ["passed", "passed", "wrong_answer", "passed", "runtime_error"]
    assert (verdict.tests[2].output, verdict.tests[2].expected) == ("10", "9")
    assert verdict.tests[4].error.endswith("ValueError: 5\n") and verdict.tests_passed == 3


def test_a_time_limit_in_batched_stdin_tests(ex):
    stopping = Grader(ex, time_limit_s=0.4, stop_after_time_limit=True).grade_program(SQUARES, square(loop=2))
    assert [t.status for t in stopping.tests] == ["passed", "time_limit", "not_run", "not_run", "not_run"]
    assert stopping.verdict == "time_limit" and stopping.tests[1].wall_s >= 0.4
    going = Grader(ex, time_limit_s=0.4, stop_after_time_limit=False).grade_program(SQUARES, square(loop=2, wrong=4))
    assert [t.status for t in going.tests] == ["passed", "time_limit", "passed", "wrong_answer", "passed"]


def test_stop_at_first_failure_in_batched_stdin_tests(ex):
    grader = Grader(ex, time_limit_s=2, stop_at_first_failure=True)
    verdict = grader.grade_program(SQUARES, square(fail=2))
    assert [t.status for t in verdict.tests] == ["passed", "runtime_error", "not_run", "not_run", "not_run"]
    verdict = grader.grade_program(SQUARES, square(wrong=2))
    assert [t.status for t in verdict.tests] == ["passed", "wrong_answer", "not_run", "not_run", "not_run"]
    assert grader.grade_program(SQUARES, square()).verdict == "accepted"


DEEP_DIRS = ("import os, sys\nprint(sorted(os.listdir('.')))\nif sys.stdin.read() == 'deep':\n"
             "    for _ in range(3000):\n        os.mkdir('d')\n        os.chdir('d')\n")


def test_files_a_run_leaves_beyond_cleaning_never_reach_the_next_run(ex):
    # 3000 nested directories, more than a walk of the scratch dir would clean: each run has a scratch tmpfs of
    # its own, gone with it.
    outs = run_many(ex, DEEP_DIRS, [b"deep", b"look", b"deep", b"look"])
    assert [(o.status, o.stdout) for o in outs] == [("ok", b"[]\n")] * 4, outs


BIG_STDIN = ("import hashlib, sys\ndata = sys.stdin.buffer.read()\nprint(len(data), hashlib.sha256(data).hexdigest())\n"
             "try:\n    with open('f', 'wb') as f:\n        f.write(b'x' * 5000)\n    print('wrote')\nexcept OSError as e:\n    print('EFBIG' if e.errno == 27 else e)\n")


def test_batched_runs_take_stdin_larger_than_the_file_size_limit(ex):
    # The fork server writes each run's stdin into a sealed file: the file-size limit is the program's alone.
    import hashlib
    import os as _os

    small = Limits(wall_s=10, cpu_s=10, memory_mb=512, file_bytes=1000)
    stdins = [_os.urandom(3 << 20), b"short", _os.urandom(2 << 20)]
    outs = run_many(ex, BIG_STDIN, stdins, limits=small)
    assert [o.stdout.decode().split() for o in outs] == [
        [str(len(s)), hashlib.sha256(s).hexdigest(), "EFBIG"] for s in stdins]


CLOSES_OR_EXITS = ("import os\ndef f(x):\n    if x == 'close':\n        os.close(3)\n"
                   "    if x == 'exit':\n        os._exit(0)\n    return x\n")


def test_a_program_that_cuts_its_channel_loses_nothing_and_one_that_exits_quietly_ends_its_session(ex):
    # A call's process has no request channel to close (its call was read by the session's process): trying
    # is that call's own error, and the session goes on. Exiting without an answer (even with code 0) is a
    # runtime error of that call, never "ok", and ends the session.
    with ex.session(CLOSES_OR_EXITS) as s:
        closed = s.call_many("f", [["a"], ["close"], ["b"]], timeout_s=5)
    assert [(o.status, o.value) for o in closed] == [("ok", "a"), ("runtime_error", None), ("ok", "b")]
    assert closed[1].error.endswith("OSError: [Errno 9] Bad file descriptor\n"), closed[1].error
    with ex.session(CLOSES_OR_EXITS) as s:
        exited = s.call_many("f", [["a"], ["exit"], ["b"]], timeout_s=5)
    assert [(o.status, o.value) for o in exited] == [("ok", "a"), ("runtime_error", None), ("runtime_error", None)]
    assert "exit code 0" in exited[1].error
    assert run(ex, "print('still serving')").stdout == b"still serving\n"
