"""Calls that share one time limit (``Session.shared_limit``: the calls of one check test): one process of the
program runs them all, one after another, and is billed all the CPU time it spends from its start to its end;
the next shared limit, or call, is a fresh process with nothing of it."""

from __future__ import annotations

import time

import pytest

from sandbox.executor import ExecutorError, Executor, Limits

LIMITS = Limits(wall_s=20, cpu_s=20, memory_mb=512)


@pytest.fixture(scope="module")
def ex():
    with Executor(1, isolation="auto", limits=LIMITS) as executor:
        yield executor


STATE = r'''
import os, sys, threading, time

sys.stderr.write("top-level code\n")
state = []


def note(x):
    state.append(x)
    print("note", x)
    return [os.getpid(), list(state), threading.active_count()]


def spawn():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fail():
    raise ValueError("no")
'''


def test_the_calls_of_a_shared_limit_run_in_one_process_and_the_next_starts_fresh(ex):
    with ex.session(STATE) as s:
        with s.shared_limit(timeout_s=5) as test:
            first, second = test.call("note", [1]), test.call("note", [2])
            child = test.call("spawn", [])
            failed = test.call("fail", [])  # an exception is that call's error; the process serves on
            third, batched = test.call_many("note", [[3], [3.5]])  # a batch of the same test: the same process
            child_alive = test.call("alive", [child.value])
        with s.shared_limit(timeout_s=5) as again:
            fourth = again.call("note", [4])
            child_alive_after = again.call("alive", [child.value])
        alone = s.call("note", [5], timeout_s=5)
    pid = first.value[0]
    assert first.value == [pid, [1], 1] and second.value == [pid, [1, 2], 1]
    assert (failed.status, failed.error.splitlines()[-1]) == ("runtime_error", "ValueError: no")
    assert third.value == [pid, [1, 2, 3], 2] and batched.value == [pid, [1, 2, 3, 3.5], 2]
    assert child_alive.value is True  # the thread and the child it started
    assert test.end_status is None and again.end_status is None
    # The top-level code ran once per process; each call's output is its own.
    assert (first.stderr, second.stderr, first.stdout, second.stdout) == (b"top-level code\n", b"", b"note 1\n", b"note 2\n")
    # The next shared limit and the next call: fresh processes, nothing of the first (its thread and child gone).
    assert fourth.value[1:] == [[4], 1] and fourth.value[0] != pid and child_alive_after.value is False
    assert alone.value[1:] == [[5], 1] and fourth.stderr == alone.stderr == b"top-level code\n"


BURN = r'''
import threading, time


def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return 1


def burn_later(seconds):
    threading.Thread(target=burn, args=(seconds,), daemon=True).start()
    return 0


def nap(seconds):
    time.sleep(seconds)
    return 1
'''


def test_the_calls_of_a_shared_limit_are_billed_together(ex):
    with ex.session(BURN) as s:
        with s.shared_limit(timeout_s=0.5) as test:
            outcomes = [test.call("burn", [0.2]) for _ in range(3)]  # 0.2 s, 0.4 s, then 0.6 s in all
        assert [o.status for o in outcomes] == ["ok", "ok", "time_limit"], outcomes
        assert s.call("burn", [0], timeout_s=1).status == "time_limit"  # a time limit ends the session, as a call's does
    # Within the limit: ten calls of 0.03 s under a limit of 0.5 s.
    with ex.session(BURN) as s:
        with s.shared_limit(timeout_s=0.5) as test:
            assert [test.call("burn", [0.03]).status for _ in range(10)] == ["ok"] * 10
        assert test.end_status is None and s.call("burn", [0], timeout_s=1).status == "ok"


@pytest.mark.parametrize("when", ["between", "after"])
def test_cpu_time_spent_between_or_after_the_calls_of_a_shared_limit_is_billed(ex, when):
    # A call answers at once and leaves a thread computing: its CPU time is the shared limit's, whether the
    # next call of the limit finds it spent or the limit's end does.
    with ex.session(BURN) as s:
        with s.shared_limit(timeout_s=0.2) as test:
            assert test.call("burn_later", [5.0]).status == "ok"
            time.sleep(1.5)  # (a loaded machine gives the thread a third of a CPU: still 0.5 s)
            if when == "between":
                assert test.call("burn", [0]).status == "time_limit"
        if when == "after":
            assert test.end_status is not None and test.end_status.status == "time_limit"
        assert s.call("burn", [0], timeout_s=1).status == "time_limit"


def test_the_wall_clock_backstop_holds_for_a_shared_limit_as_a_whole(ex):
    # Waiting is not computing; the calls' summed wall-clock time is cut at twice the limit (1 s here).
    with ex.session(BURN) as s:
        with s.shared_limit(timeout_s=0.5) as test:
            outcomes = [test.call("nap", [0.4]) for _ in range(3)]
    assert [o.status for o in outcomes] == ["ok", "ok", "time_limit"]


def test_calls_outside_a_shared_limit_wait_until_it_ends(ex):
    with ex.session(BURN) as s:
        with s.shared_limit(timeout_s=1) as test:
            assert test.call("burn", [0]).status == "ok"
            with pytest.raises(ExecutorError, match="outside the calls of a shared time limit"):
                s.call("burn", [0], timeout_s=1)
            with pytest.raises(ExecutorError, match="do not nest"):
                with s.shared_limit(timeout_s=1):
                    pass
        with pytest.raises(ExecutorError, match="after it ended"):
            test.call("burn", [0])
        assert s.call("burn", [0], timeout_s=1).status == "ok"
