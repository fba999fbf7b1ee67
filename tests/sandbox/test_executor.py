"""The executor's behaviour on ordinary programs: stdin runs, function calls, errors, limits, threads."""

from __future__ import annotations

import math
import threading

import pytest

from sandbox.codec import PlainDataError, decode_value, encode_value
from sandbox.executor import Executor, Limits


@pytest.fixture(scope="module")
def ex():
    with Executor(2, isolation="full", limits=Limits(wall_s=10, cpu_s=10)) as executor:
        yield executor


def run(ex, code, stdin=b"", timeout_s=5.0, limits=None):
    with ex.session(code, limits=limits) as s:
        return s.run_stdin(stdin, timeout_s=timeout_s)


@pytest.mark.parametrize(
    "code",
    [
        "a, b = map(int, input().split())\nprint(a + b)",
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
        "print(sum(map(int, open(0).read().split())))",
        "import sys\nsys.stdout.buffer.write(str(sum(map(int, sys.stdin.buffer.read().split()))).encode() + b'\\n')",
        "import os, sys\nos.write(1, (str(sum(map(int, sys.stdin.buffer.read().split()))) + '\\n').encode())",
        "import sys\nxs = sys.stdin.read().split()\nprint(int(xs[0]) + int(xs[1]), end='')\nprint(end='\\n')",
    ],
)
def test_stdin_programs_every_way_of_reading_and_writing(ex, code):
    out = run(ex, code, b"40 2\n")
    assert (out.status, out.exit_code, out.stdout, out.error) == ("ok", 0, b"42\n", None)


def test_each_run_is_a_fresh_main(ex):
    code = "import sys\ncounter = globals().get('counter', 0) + 1\nprint(__name__, counter, sys.stdin.read())"
    with ex.session(code) as s:
        outs = [s.run_stdin(str(i).encode(), timeout_s=5) for i in range(3)]
    assert [o.stdout for o in outs] == [b"__main__ 1 0\n", b"__main__ 1 1\n", b"__main__ 1 2\n"]


def test_large_stdin_and_output_round_trip(ex):
    data = bytes(range(256)) * 4000  # 1 MB, not UTF-8
    out = run(ex, "import sys\nsys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])", data,
              limits=Limits(output_bytes=2 << 20))
    assert out.status == "ok" and out.stdout == data[::-1]


def test_non_utf8_output_is_bytes(ex):
    out = run(ex, "import os, sys\nos.write(1, b'\\xff\\xfe\\x80')\nsys.stderr.buffer.write(b'\\xc3(')")
    assert out.status == "ok" and out.stdout == b"\xff\xfe\x80" and out.stderr == b"\xc3("


def test_exit_codes(ex):
    assert run(ex, "import sys\nprint('x')\nsys.exit(0)").status == "ok"
    out = run(ex, "import sys\nsys.exit(3)")
    assert (out.status, out.exit_code) == ("runtime_error", 3)
    out = run(ex, "exit('bye')")
    assert out.status == "runtime_error" and out.stderr == b"bye\n"


def test_runtime_error_text_has_at_most_three_solution_frames(ex):
    code = "def a(n):\n    return b(n)\ndef b(n):\n    return c(n)\ndef c(n):\n    return d(n)\ndef d(n):\n    return 1 // n\na(0)\n"
    out = run(ex, code)
    assert out.status == "runtime_error" and out.exit_code == 1
    err = out.error
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.rstrip().endswith("ZeroDivisionError: integer division or modulo by zero")
    frames = [line for line in err.splitlines() if line.startswith("  File ")]
    assert frames == ['  File "<solution>", line 4, in b', '  File "<solution>", line 6, in c', '  File "<solution>", line 8, in d']
    assert "    return 1 // n" in err
    assert "runner" not in err and "exec(" not in err


def test_syntax_error(ex):
    out = run(ex, "def f(:\n  pass\n")
    assert out.status == "runtime_error" and "SyntaxError" in out.error
    with ex.session("def f(:\n  pass\n") as s:
        first = s.call("f", [], timeout_s=5)
        second = s.call("f", [], timeout_s=5)
    assert first.status == second.status == "runtime_error" and "SyntaxError" in first.error


def test_timeout(ex):
    out = run(ex, "while True: pass", timeout_s=0.5)
    assert out.status == "time_limit" and 0.5 <= out.wall_s < 5.0


def test_cpu_limit(ex):
    out = run(ex, "while True: pass", timeout_s=30, limits=Limits(cpu_s=1, wall_s=30))
    # Killed by RLIMIT_CPU (SIGXCPU, or SIGKILL at the hard limit), not by the wall clock (exit_code None).
    assert out.status == "time_limit" and out.exit_code in (-24, -9)


def test_functional_calls_keep_types(ex):
    code = (
        "def f(x):\n    return x\n"
        "def g():\n    return (1, [2, (3,)], {4, 5}, {'a': (1, 2), 7: None}, float('nan'), float('inf'), -float('inf'), b'\\x00\\xff', 2**100, -2**70, True, 1.5, frozenset({1}))\n"
    )
    with ex.session(code) as s:
        got = s.call("g", [], timeout_s=5)
        assert got.status == "ok"
        v = got.value
        assert type(v) is tuple and v[0] == 1 and type(v[1]) is list and type(v[1][1]) is tuple
        assert v[2] == {4, 5} and type(v[2]) is set and v[3] == {"a": (1, 2), 7: None}
        assert math.isnan(v[4]) and v[5] == math.inf and v[6] == -math.inf
        assert v[7] == b"\x00\xff" and v[8] == 2**100 and v[9] == -(2**70) and v[10] is True and v[11] == 1.5
        assert type(v[12]) is frozenset
        args = [(1, 2), [3], {"k": [1, {2}]}, None, "é", 10**30]
        echo = s.call("f", [args], timeout_s=5)
        assert echo.status == "ok" and echo.value == args and type(echo.value[0]) is tuple


def test_solution_method_and_each_call_a_fresh_program(ex):
    code = (
        "calls = []\nprint('loaded')\n"
        "class Solution:\n    def __init__(self):\n        self.n = 0\n"
        "    def add(self, a, b):\n        self.n += 1\n        calls.append(a)\n        print('adding', a, b)\n        return a + b, self.n, len(calls)\n"
    )
    with ex.session(code) as s:
        first = s.call("Solution.add", [1, 2], timeout_s=5)
        second = s.call("Solution.add", [5, 6], timeout_s=5)
    assert (first.status, first.value, first.stdout) == ("ok", (3, 1, 1), b"loaded\nadding 1 2\n")
    # A fresh Solution() and a fresh program per call: the top-level code runs again, nothing is kept.
    assert (second.value, second.stdout) == ((11, 1, 1), b"loaded\nadding 5 6\n")


def test_exception_in_a_call_keeps_the_program(ex):
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x * 2\n"
    with ex.session(code) as s:
        bad = s.call("f", [-1], timeout_s=5)
        good = s.call("f", [21], timeout_s=5)
        missing = s.call("nope", [], timeout_s=5)
    assert bad.status == "runtime_error" and bad.error.endswith("ValueError: negative\n") and 'line 3, in f' in bad.error
    assert (good.status, good.value) == ("ok", 42)
    assert missing.status == "runtime_error" and "KeyError" in missing.error


def test_call_timeout_ends_the_program(ex):
    code = "def f(x):\n    while x: pass\n    return 1\n"
    with ex.session(code) as s:
        assert s.call("f", [0], timeout_s=5).value == 1
        slow = s.call("f", [1], timeout_s=0.3)
        after = s.call("f", [0], timeout_s=5)
    assert slow.status == "time_limit" and after.status == "time_limit" and after.wall_s == 0.0


def test_session_wall_budget_covers_all_calls(ex):
    code = "import time\ndef f():\n    time.sleep(0.3)\n    return 1\n"
    with ex.session(code, limits=Limits(wall_s=1.0)) as s:
        statuses = [s.call("f", [], timeout_s=5).status for _ in range(5)]
    # 0.3 s per call against a 1 s budget: at most three calls fit, the budget ends the program after.
    assert statuses[0] == "ok" and 1 <= statuses.count("ok") <= 3 and statuses[-1] == "time_limit"
    assert statuses == sorted(statuses)  # every "ok" before every "time_limit"


def test_many_small_calls_are_cheap(ex):
    import time

    with ex.session("def f(a, b):\n    return a + b\n") as s:
        s.call("f", [0, 0], timeout_s=5)
        t = time.perf_counter()
        values = [s.call("f", [i, i], timeout_s=5).value for i in range(100)]
        per_call = (time.perf_counter() - t) / 100
    assert values == [2 * i for i in range(100)]
    # A process of its own per call: typically 4 ms on a loaded 2-core machine; generous for a busier one.
    assert per_call < 0.050, per_call


def test_sessions_in_parallel_threads(ex):
    code = "import sys, time\nn = int(sys.stdin.read() or 0)\ntime.sleep(0.05)\nprint(n * n)\ndef sq(n):\n    return n * n\n"
    results, errors = {}, []

    def work(i):
        try:
            with ex.session(code) as s:
                r = s.run_stdin(str(i).encode(), timeout_s=5)
                c = s.call("sq", [i], timeout_s=5)
            results[i] = (r.stdout, c.value)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: (b"%d\n" % (i * i), i * i) for i in range(12)}


PROCESS_KINDS = """
import os, signal, threading

def threads(n):
    out, lock = [0] * n, threading.RLock()
    def work(i):
        with lock:
            with lock:
                out[i] = i * i
    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out

def children(n):
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.write(w, bytes([i * 3]))
            os._exit(i)
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids)
    got = sorted(os.read(r, 1)[0] for _ in range(n))
    return codes, got

def signals():
    seen = []
    signal.signal(signal.SIGUSR1, lambda *a: seen.append("usr1"))
    signal.raise_signal(signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    return seen

def ids():
    return os.getpid(), os.getppid()
"""


def test_a_program_is_pid_1_of_its_own_namespace_and_threads_forks_signals_work(ex):
    n = 5
    pids = []
    for _ in range(2):
        with ex.session(PROCESS_KINDS) as s:
            pids.append(s.call("ids", [], timeout_s=5).value)
            assert s.call("threads", [n], timeout_s=5).value == [i * i for i in range(n)]
            got = s.call("children", [n], timeout_s=10)
            assert got.status == "ok", got
            assert got.value == ([i for i in range(n)], [3 * i for i in range(n)])
            assert s.call("signals", [], timeout_s=5).value == ["usr1", "usr1"]
        run_ids = run(ex, PROCESS_KINDS + "print(*ids())\n")
        assert run_ids.stdout == b"1 0\n"
    # Each program is PID 1 of a namespace of its own (a run: the process itself; a call session: the process
    # whose child, PID 2, runs the first call); the fork server is outside it.
    assert pids == [(2, 1), (2, 1)]


def test_codec_rejects_non_plain_and_malformed():
    class MyInt(int):
        pass

    for bad in (MyInt(3), object(), [1, MyInt(2)], {"a": lambda: 1}):
        with pytest.raises(PlainDataError, match="not plain data"):
            encode_value(bad)
    for text in ('{"x": 1}', '{"t": 1}', '{"s": [[1]]}', "NaN", '{"i": "zz"}', "[" * 10000 + "]" * 10000):
        with pytest.raises(PlainDataError):
            decode_value(text)
    v = [1, (2, 3), {4}, {5: 6}, float("inf"), 2**200, b"x", "s", None, False]
    assert decode_value(encode_value(v)) == v


def test_isolation_modes_report_and_refuse(caplog):
    from sandbox.executor import ExecutorError

    with pytest.raises(ExecutorError, match="seccomp"):
        Executor(1, isolation="full", disable={"seccomp"})
    with caplog.at_level("WARNING", logger="sandbox.executor"):
        with Executor(1, isolation="auto", disable={"seccomp"}) as partial:
            report = partial.isolation_report()
            assert run(partial, "print(2 + 2)").stdout == b"4\n"
    assert report["seccomp"] is False and report["bwrap"] and report["pid_namespace"] and report["uid_drop"]
    assert any("MISSING: seccomp" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sandbox.executor"):
        with Executor(1, isolation="none") as bare:
            assert not any(v for k, v in bare.isolation_report().items() if k != "rlimits")
            assert run(bare, "print(input())", b"hi\n").stdout == b"hi\n"
    assert any("ISOLATION IS OFF" in r.getMessage() for r in caplog.records)


def test_error_in_top_level_code_ends_the_program(ex):
    code = "print('starting')\nraise RuntimeError('boom')\ndef f():\n    return 1\n"
    with ex.session(code) as s:
        first = s.call("f", [], timeout_s=5)
        second = s.call("f", [], timeout_s=5)
    assert first.status == "runtime_error" and first.error.endswith("RuntimeError: boom\n")
    assert first.stdout == b"starting\n"
    assert (second.status, second.error, second.wall_s, second.stdout) == ("runtime_error", first.error, 0.0, b"")


def test_each_worker_and_its_programs_run_on_one_cpu():
    import os

    import psutil

    allowed = sorted(os.sched_getaffinity(0))
    with Executor(3, limits=Limits(wall_s=10, cpu_s=10)) as ex3:
        for i, w in enumerate(ex3._pool._all):
            tree = [w.proc.pid] + [p.pid for p in psutil.Process(w.proc.pid).children(recursive=True)]
            assert {frozenset(os.sched_getaffinity(pid)) for pid in tree} == {frozenset({allowed[i % len(allowed)]})}
        seen = set()
        for _ in range(6):  # the pool lends its workers in turn
            seen.add(run(ex3, "import os\nprint(sorted(os.sched_getaffinity(0)))").stdout)
        assert seen == {("[%d]\n" % c).encode() for c in allowed[:3]}
    with Executor(1, limits=Limits(wall_s=10, cpu_s=10), pin_cpus=False) as free:
        assert run(free, "import os\nprint(sorted(os.sched_getaffinity(0)))").stdout == ("%s\n" % allowed).encode()
    # By default only workers that cover every allowed CPU are pinned (a big shared node stays the scheduler's).
    with Executor(1, limits=Limits(wall_s=10, cpu_s=10)) as one, \
            Executor(1, limits=Limits(wall_s=10, cpu_s=10), pin_cpus=True) as forced:
        expected = allowed if len(allowed) > 1 else allowed[:1]
        assert run(one, "import os\nprint(sorted(os.sched_getaffinity(0)))").stdout == ("%s\n" % expected).encode()
        assert run(forced, "import os\nprint(sorted(os.sched_getaffinity(0)))").stdout == ("%s\n" % allowed[:1]).encode()


def test_a_session_runs_its_thread_on_its_workers_cpu_and_moves_it_back():
    import os

    before = os.sched_getaffinity(0)
    with Executor(2, limits=Limits(wall_s=10, cpu_s=10)) as ex2:
        for _ in range(4):
            with ex2.session("def f():\n    import os\n    return sorted(os.sched_getaffinity(0))") as s:
                inside = os.sched_getaffinity(0)
                assert inside == set(s.call("f", [], timeout_s=5).value)  # the worker's CPU, for both sides
                assert len(inside) == 1
            assert os.sched_getaffinity(0) == before
