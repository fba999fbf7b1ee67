"""Verdicts that cannot be forged: attack programs (tests/sandbox/integrity_attacks.py) run through the real
grader and executor with every isolation layer on, each graded as what it solved, next to an honest solution
whose verdict is the same as ever.

- copying a sibling: a program's process holds no earlier program's source or input;
- seeing the future: it holds no later test's input (a call's arguments, a run's stdin), so nothing can be
  computed ahead; a run has no parent in its namespace whose reports it could forge;
- pooling time: every call (every check test, whose calls share its limit) is a fresh child of a process that
  never runs the program's code, so nothing computed during one call or test (in a global, a file, a process
  or a thread left behind, or by a program that serves its own calls) is there for the next; a check test is
  billed every thread of its process;
- stalling the trusted process: a value built to be slow to decode (colliding hashes) is refused at once, a
  flood on the response channel is capped in the fork server without the cgroup layer;
- moving to another CPU is denied;
- numbers compare as ASCII decimals.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from sandbox.codec import MAX_DECODE_SECONDS
from sandbox.executor import Executor, Limits
from sandbox.grader import Grader, stdout_matches
from sandbox.problems import Problem, ProblemTest
from tests.sandbox import integrity_attacks as A

LIMITS = Limits(wall_s=10, cpu_s=10, memory_mb=512)


@pytest.fixture(scope="module")
def ex():
    # One worker: every program of this module runs in the same fork server, one after another, as the
    # rollouts of one problem do on a worker.
    with Executor(1, isolation="full", limits=LIMITS) as executor:
        yield executor


def f(n: int) -> int:
    """The trusted copy of SLOW_F."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x


# ------------------------------------------------------------------------------------------- a sibling's source
MYSTERY = Problem(id="mystery", prompt="", func_name="mystery", tests=[
    ProblemTest(kind="functional", input=str(x), output=str(7 * x + 3)) for x in (1, 2, 5, 100)])


def test_a_copycat_finds_no_sibling_to_copy(ex):
    grader = Grader(ex, time_limit_s=5.0)
    assert grader.grade_program(MYSTERY, A.MYSTERY_SOLUTION).verdict == "accepted"
    for _ in range(3):  # whatever the worker served before: the honest solution, or a copycat
        copycat = grader.grade_program(MYSTERY, A.COPYCAT)
        assert copycat.verdict == "wrong_answer" and copycat.tests_passed == 0, copycat.feedback
    assert grader.grade_program(MYSTERY, A.MYSTERY_SOLUTION).verdict == "accepted"


def test_no_other_programs_source_input_or_arguments_in_a_programs_memory(ex):
    tag = uuid.uuid4().hex[:8]
    leaker = A.LEAKER.replace("%s", tag)
    with ex.session(leaker) as s:
        assert s.run_stdin(("LEAKMARK-%s-stdin\n" % tag).encode(), timeout_s=5).status == "ok"
    with ex.session(leaker) as s:
        assert s.call("f", ["LEAKMARK-%s-args" % tag], timeout_s=5).status == "ok"
    with ex.session(A.LEAK_SCANNER) as s:
        as_run = s.run_stdin(b"", timeout_s=10)
    with ex.session(A.LEAK_SCANNER + "def look():\n    return found()\n") as s:
        as_call = s.call("look", [], timeout_s=10)
    assert as_run.status == "ok" and as_call.status == "ok", (as_run, as_call)
    assert tag.encode() not in as_run.stdout and not any(tag in m for m in as_call.value), (as_run.stdout, as_call.value)


# --------------------------------------------------------------------------------------- the future, time pooling
def _calibrated(ex, hard: int) -> float:
    """A time limit the honest solution misses on ``hard`` by a wide margin (0.6 of its CPU time here): its
    fastest of five runs, since a run slowed by another process would set a limit the honest solution meets (on
    two shared cores the CPU time of the same work varies by up to 1.5 times; three runs once all came out slow
    enough in a full suite that the honest solution met 0.6 of their fastest)."""
    timed = A.HONEST_F + "import time\ndef cpu(n):\n    t = time.process_time()\n    f(n)\n    return time.process_time() - t\n"
    with ex.session(timed) as s:
        took = [s.call("cpu", [hard], timeout_s=30) for _ in range(5)]
    assert all(t.status == "ok" for t in took), took
    return min(t.value for t in took) * 0.6


HARD = 6_000_000


def test_a_call_program_sees_no_later_arguments_and_cannot_pool_time(ex):
    limit = _calibrated(ex, HARD)
    problem = Problem(id="future", prompt="", func_name="solve", tests=[
        ProblemTest(kind="functional", input=str(n), output=str(f(n))) for n in (1000, 2000, 3000, 4000, HARD)])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, HONEST_SOLVE)
    assert honest.verdict == "time_limit" and honest.tests_passed == 4, honest.feedback
    attack = grader.grade_program(problem, A.FUTURE_CALLS.format(stall=0.85 * limit))
    assert attack.verdict == "time_limit" and attack.tests_passed == 4, attack.feedback
    # What each call found in its memory: at most its own and earlier calls' arguments.
    args = [1000, 2000, 3000, 4000, HARD]
    for i, test in enumerate(attack.tests[:4]):
        (seen,) = re.findall(r"saw (\[.*\])", test.stderr)
        assert set(json.loads(seen)) <= set(args[: i + 1]), (i, seen)


def test_a_stdin_run_sees_no_later_input_and_has_no_parent_to_forge(ex):
    limit = _calibrated(ex, HARD)
    inputs = ["EASY 1000", "EASY 2000", "HARD %d" % HARD]
    problem = Problem(id="forge", prompt="", tests=[
        ProblemTest(kind="stdin", input=s + "\n", output=str(f(int(s.split()[1])))) for s in inputs])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, A.HONEST_F + "print(f(int(input().split()[1])))\n")
    assert honest.verdict == "time_limit" and honest.tests_passed == 2, honest.feedback
    attack = grader.grade_program(problem, A.FORGER.format(stall=0.85 * limit))
    assert attack.verdict == "time_limit" and attack.tests_passed == 2, attack.feedback
    # What each run found in its memory: at most its own input.
    for test, n in zip(attack.tests, [1000, 2000, HARD]):
        (seen,) = re.findall(r"saw (\[.*\])", test.stderr)
        assert set(json.loads(seen)) <= {n} if test.input.startswith("HARD") else json.loads(seen) == [], test.stderr


def pooling_problem(problem_id: str, easy: list[int]) -> Problem:
    """A problem of `solve(n) = f(n)` whose tests are the easy inputs, then HARD: the pooling attacks' target."""
    return Problem(id=problem_id, prompt="", func_name="solve", tests=[
        ProblemTest(kind="functional", input=str(n), output=str(f(n))) for n in [*easy, HARD]])


HONEST_SOLVE = A.HONEST_F.replace("def f(", "def solve(")  # f itself, too slow for HARD within its limit


def test_cpu_time_cannot_be_pooled_across_calls_by_a_thread_left_running(ex):
    limit = _calibrated(ex, HARD)
    problem = pooling_problem("pool", [1000, 2000, 3000, 4000, 5000])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, HONEST_SOLVE)
    assert honest.verdict == "time_limit" and honest.tests_passed == 5, honest.feedback
    # The thread started by the top-level code ends with each call's process: the hard call's process computes
    # the answer from its start, within the hard test's own limit, or not at all. (An easy call, which waits
    # 0.85 of its limit while the thread computes, may itself run out on a loaded machine: the tests after it
    # are then not run.)
    attack = grader.grade_program(problem, A.POOLING.format(hard=HARD, stall=0.85 * limit))
    assert attack.verdict == "time_limit" and attack.tests[-1].status in ("time_limit", "not_run"), attack.feedback
    # Honest: main on a thread it joins, a table made at top level; ten calls of 0.15 s each, 1.5 s in all,
    # within a limit of 1 s per call (the wall-clock backstop, 2 s, leaves room for a loaded machine).
    n = int(HARD * 0.15 / (limit / 0.6))
    threaded = Problem(id="threaded", prompt="", func_name="solve", tests=[
        ProblemTest(kind="functional", input=str(n + k), output=str(f(n + k))) for k in range(10)])
    verdict = Grader(ex, time_limit_s=1.0).grade_program(threaded, A.THREAD_MAIN)
    assert verdict.verdict == "accepted", [t.status for t in verdict.tests]


def test_cpu_time_cannot_be_pooled_across_calls_by_a_program_serving_its_own_calls(ex):
    limit = _calibrated(ex, HARD)
    problem = pooling_problem("hijack", [1000, 2000, 3000, 4000, 5000])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, HONEST_SOLVE)
    assert [t.status for t in honest.tests] == ["passed"] * 5 + ["time_limit"], honest.feedback
    # One thread, its own request loop: each call's window holds at most 0.6 of a limit, and the hard test's
    # answer (1.7 limits of CPU) is spread over the easy calls. Each call is a process of its own, which serves
    # that call alone: the hard test is computed within its own limit, or not at all.
    attack = grader.grade_program(problem, A.HIJACK.format(hard=HARD, stall=0.6 * limit))
    assert [t.status for t in attack.tests] == ["passed"] * 5 + ["time_limit"], attack.feedback


def live_pooling_problem(problem_id: str, easy: list[int]) -> Problem:
    """``pooling_problem`` as check tests whose one call is made live (not planned ahead): each test its own
    process of the program, and its own limit."""
    return Problem(id=problem_id, prompt="", func_name="solve", tests=[
        ProblemTest(kind="check", input="n = %d\nassert candidate(n) == %d\n" % (n, f(n))) for n in [*easy, HARD]])


@pytest.mark.parametrize("attack", ["thread", "self-serving"])
def test_cpu_time_cannot_be_pooled_across_check_tests(ex, attack):
    # The hard test takes 2.8 limits (a margin for a loaded machine, where one run's CPU time per step can be
    # 1.5 times another's).
    limit = 0.6 * _calibrated(ex, HARD)
    problem = live_pooling_problem("pool-check", [1000, 2000, 3000, 4000, 5000])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, HONEST_SOLVE)
    assert [t.status for t in honest.tests] == ["passed"] * 5 + ["time_limit"], honest.feedback
    # A thread started by the top-level code, or a program that answers the call itself and computes on before
    # it reads the next call from its channel: each test's process ends with the test, so the hard test starts
    # from nothing again.
    code = (A.POOLING.format(hard=HARD, stall=0.85 * limit) if attack == "thread" else
            A.HIJACK.format(hard=HARD, stall=0.6 * limit))
    verdict = grader.grade_program(problem, code)
    assert verdict.verdict == "time_limit" and verdict.tests[-1].status in ("time_limit", "not_run"), verdict.feedback


def test_the_calls_of_one_check_test_are_billed_every_thread_of_its_process(ex):
    # One test whose calls share its limit: the thread's CPU time, spent while the easy calls wait, is the test's.
    limit = _calibrated(ex, HARD)
    cases = ", ".join("(%d, %d)" % (n, f(n)) for n in (1000, 2000, HARD))
    problem = Problem(id="pool-one-test", prompt="", func_name="solve", tests=[
        ProblemTest(kind="check", input="for n, want in [%s]:\n    assert candidate(n) == want\n" % cases)])
    grader = Grader(ex, time_limit_s=limit)
    assert grader.grade_program(problem, HONEST_SOLVE).verdict == "time_limit"
    verdict = grader.grade_program(problem, A.POOLING.format(hard=HARD, stall=0.3 * limit))
    assert verdict.verdict == "time_limit", verdict.feedback


@pytest.mark.parametrize("keep", ["global", "file", "orphan"])
def test_cpu_time_cannot_be_pooled_in_what_a_call_leaves(ex, keep):
    limit = _calibrated(ex, HARD)
    problem = pooling_problem("chunks", [1000 * k for k in range(1, 9)])
    grader = Grader(ex, time_limit_s=limit)
    honest = grader.grade_program(problem, HONEST_SOLVE)
    assert [t.status for t in honest.tests] == ["passed"] * 8 + ["time_limit"], honest.feedback
    # Each easy call computes 0.3 of a limit of the hard answer (1.7 limits in all, 2.4 in the easy calls) and
    # keeps where it got to: in a global, a file, or a process left sleeping. Every call starts from the state
    # before any call ran (the orphan and the file are gone): the hard test is computed within its own limit,
    # or not at all.
    attack = grader.grade_program(problem, A.CHUNKED.format(hard=HARD, chunk=0.3 * limit, keep=keep))
    assert [t.status for t in attack.tests] == ["passed"] * 8 + ["time_limit"], attack.feedback


def test_a_call_leaves_nothing_for_the_next(ex):
    tag = uuid.uuid4().hex[:8]
    with ex.session(A.LEAVES_STATE) as s:
        first = s.call("leave", [tag], timeout_s=10)
        second = s.call("look", [], timeout_s=10)
    assert first.status == "ok" and second.status == "ok", (first, second)
    _, changed = first.value
    assert changed[:7] == [["a", "fifo", "link"], ["user.kept"], 0o751, 67890 * 10**9, os.O_NONBLOCK | os.O_APPEND,
                           1 << 20, changed[6]] and changed[6] > 0, changed
    # The next call finds an empty scratch dir as the first found it, its own stdin and stdout, and none of the
    # first call's bytes in its memory (they passed through the session's process, which every call inherits).
    assert second.value == [[], [], 0o700, 0, 0, 1 << 16, 0, []], second.value


@pytest.mark.parametrize("keep", ["global", "file"])
def test_cpu_time_cannot_be_pooled_through_the_command_line(ex, tmp_path, keep):
    from tests.sandbox.test_cli import opsd, write

    limit = _calibrated(ex, HARD)
    problem = write(tmp_path / "p.json", pooling_problem("chunks", [1000 * k for k in range(1, 9)]).model_dump_json())
    attack = write(tmp_path / "attack.py", A.CHUNKED.format(hard=HARD, chunk=0.3 * limit, keep=keep))
    res = opsd("check", problem, attack, "--json", "--time-limit", "%.3f" % limit)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert (out["verdict"], out["tests_passed"], out["tests_total"]) == ("time_limit", 8, 9), out


@pytest.mark.parametrize("how", ["table", "joined", "unjoined"])
def test_module_level_precomputation_and_main_on_a_thread_pass(ex, how):
    # A table made by the top-level code (0.1 s of CPU), by main on a thread with a larger stack joined there,
    # or left to end on its own (the call waits for it, as a program's exit would); then ten calls of 0.1 s.
    # Every call runs the top-level code again: 0.2 s each, within a limit of 1 s (the wall-clock backstop, 2 s,
    # leaves room for a loaded machine).
    per_step = _calibrated(ex, HARD) / 0.6 / HARD
    pre, n = int(0.1 / per_step), int(0.1 / per_step)
    problem = Problem(id="idioms", prompt="", func_name="solve", tests=[
        ProblemTest(kind="functional", input=str(n + k), output=str(f(n + k))) for k in range(10)])
    verdict = Grader(ex, time_limit_s=1.0).grade_program(problem, A.IDIOMS.format(pre=pre, how=how))
    assert verdict.verdict == "accepted", [(t.status, t.stderr) for t in verdict.tests]


@pytest.mark.parametrize("left", ["thread", "process"])
def test_a_thread_or_process_left_computing_ends_with_its_call(ex, left):
    # A call that answers at once but leaves a thread (or a child process) computing: the call's process ends
    # with its answer, and what it left with it, so nothing computes between calls or bills the next one.
    start = ("threading.Thread(target=f, args=(n,), daemon=True).start()" if left == "thread" else
             "os._exit(f(n) * 0) if os.fork() == 0 else None")
    code = A.SLOW_F + (
        "import os, threading\n"
        "def spawn(n):\n"
        "    %s\n"
        "    return 0\n"
        "def quick():\n"
        "    return 1\n") % start
    limit = _calibrated(ex, HARD)
    with ex.session(code) as s:
        first = s.call("spawn", [HARD * 20], timeout_s=limit)
        # The session's process, which holds the code and runs none of it: the fork server's younger child.
        session = max(_server_of(ex._pool._all[0]).children(), key=lambda p: p.create_time())
        left_over = session.children(recursive=True)
        time.sleep(limit)
        second = s.call("quick", [], timeout_s=limit)
    assert first.status == "ok" and second.status == "ok" and left_over == [], (first, second, left_over)
    # Waiting is not computing: a call that sleeps past its CPU limit (within the wall-clock backstop) is not
    # a time limit.
    with ex.session("import time\ndef nap(s):\n    time.sleep(s)\n    return 1\n") as s:
        assert s.call("nap", [0.6], timeout_s=0.5).status == "ok"


@pytest.fixture
def churning():
    """A process running CHURN (trusted test code: it only starts threads and one busy child)."""
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", A.CHURN], start_new_session=True)
    time.sleep(0.2)
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_cpu_reading_disturbed_by_ending_threads_fails_closed(churning, monkeypatch):
    from sandbox import runner

    program = runner.Program(churning.pid, None, None, None, None, None)
    try:
        readings, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            own = time.clock_gettime(program.clock)  # the process's own threads: less than any true reading
            reading = program.cpu()
            assert reading >= own, (readings, reading, own)
            readings += 1
        # A walk that is always disturbed reads as infinite CPU time: over any limit.
        monkeypatch.setattr(runner, "_children", lambda pid, threads: os.listdir("/proc/%d/task/0" % pid))
        assert program.cpu() == float("inf")
    finally:
        os.close(program.pidfd)


# --------------------------------------------------------------------------------------- the trusted process
@pytest.mark.parametrize("kind", ["set", "dict", "tuples", "nested"])
def test_a_value_with_colliding_hashes_is_refused_at_once(ex, kind):
    with ex.session(A.COLLIDING.format(n=40_000)) as s:
        started = time.monotonic()
        out = s.call("attack", [kind], timeout_s=10)
        took = time.monotonic() - started
    # Refused before anything is built: milliseconds on a quiet machine (decoding took 8.7-18 s before); the
    # bound leaves room for a loaded one (1.35 s seen at load average 10).
    assert out.status == "runtime_error" and "could not be decoded" in out.error and took < 5.0, (out.error, took)
    assert took < MAX_DECODE_SECONDS


def test_a_check_test_on_a_colliding_set_is_graded_in_well_under_a_second(ex):
    problem = Problem(id="colliding", prompt="", func_name="attack", tests=[
        ProblemTest(kind="check", input="assert candidate('set') == {1, 2}")])
    started = time.monotonic()
    verdict = Grader(ex, time_limit_s=5.0).grade_program(problem, A.COLLIDING.format(n=40_000))
    assert verdict.verdict == "runtime_error" and time.monotonic() - started < 1.0


def _server_of(worker) -> psutil.Process:
    """A worker's fork server: the first python process below bubblewrap."""
    return next(p for p in psutil.Process(worker.proc.pid).children(recursive=True)
                if "python" in os.path.basename(p.exe()))


def _peak_rss_kb(pid: int) -> int:
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_flood_on_the_response_channel_is_capped_without_the_cgroup_layer():
    with Executor(1, limits=LIMITS, disable={"cgroup"}) as ex1:
        server = _server_of(ex1._pool._all[0])
        before = _peak_rss_kb(server.pid)
        with ex1.session(A.FLOOD) as s:
            claim = s.call("flood", ["claim", 400], timeout_s=10)
        with ex1.session(A.FLOOD) as s:
            pour = s.call("flood", ["pour", 400], timeout_s=10)
        grown_mb = (_peak_rss_kb(server.pid) - before) / 1024
        for out in (claim, pour):  # a frame announcing more than the cap is no frame; B is ended at once
            assert out.status == "runtime_error" and out.error == "garbled response from the program", out
        assert grown_mb < 64, grown_mb
        # As a run: garbled at once, then what follows counts as output.
        flood_run = A.FLOOD + "flood('pour', 400)\n"
        with ex1.session(flood_run) as s:
            run = s.run_stdin(b"", timeout_s=10)
        assert run.status == "output_limit" and (_peak_rss_kb(server.pid) - before) / 1024 < 64, run
        with ex1.session("def ok():\n    return 1\n") as s:
            assert s.call("ok", [], timeout_s=5).value == 1


@pytest.mark.parametrize("kind", ["memfd", "socketpair", "socket"])
def test_no_memory_outside_the_address_space_limit_without_the_cgroup_layer(kind):
    # Without a cgroup (a cgroup-v2 host without a delegated subtree) only RLIMIT_AS bounds a program's memory:
    # memfds and sockets, whose pages it does not count, are refused by the seccomp filter.
    limits = Limits(wall_s=10, cpu_s=10, memory_mb=128)
    with Executor(1, limits=limits, disable={"cgroup"}) as ex1:
        with ex1.session(A.HOLD) as s:
            out = s.call("hold", [kind, 200], timeout_s=10)
    assert out.status == "ok" and out.value == [0, errno.EPERM], out


FILL = (
    "import os\n"
    "written, errors = 0, set()\n"
    "for k, d in enumerate(('.', '/tmp', '/dev/shm', '/var/tmp')):\n"
    "    for i in range(200):\n"
    "        try:\n"
    "            with open(os.path.join(d, 'fill-%d-%d' % (k, i)), 'wb') as f:\n"
    "                f.write(b'x' * 500_000)\n"
    "            written += 500_000\n"
    "        except OSError as e:\n"
    "            errors.add(e.errno)\n"
    "            break\n"
    "print(written, sorted(errors))\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="without bubblewrap, only root can give a program its own mounts")
def test_without_bubblewrap_a_programs_files_are_capped_in_total_and_stay_its_own(tmp_path):
    limits = Limits(wall_s=10, cpu_s=10, memory_mb=512, file_bytes=1 << 20, n_procs=4096)
    before = set(os.listdir("/tmp"))
    with Executor(1, limits=limits, disable={"bwrap"}) as ex1:
        with ex1.session(FILL) as s:
            out = s.run_stdin(b"", timeout_s=10)
        with ex1.session("import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('.')))") as s:
            after = s.run_stdin(b"", timeout_s=10)
    written, errors = out.stdout.split(maxsplit=1)
    # Files of the program itself: at most its scratch tmpfs (16 MiB here); /dev/shm and /var/tmp read-only.
    assert out.status == "ok" and int(written) <= 16 << 20 and set(json.loads(errors)) <= {28, 30}, out
    assert after.stdout == b"[] []\n"  # nothing left for the next program
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("fill-")}


def _template_of(worker) -> psutil.Process:
    (template,) = _server_of(worker).children()  # between programs, the fork server's only child
    return template


def test_a_dead_template_takes_its_worker_down_and_the_pool_replaces_it():
    # (The fork server cannot make another template: its memory holds requests.)
    with Executor(1, limits=LIMITS) as ex1:
        template = _template_of(ex1._pool._all[0])
        template.kill()
        deadline = time.monotonic() + 5
        while template.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        with ex1.session("print(1)") as s:
            lost = s.run_stdin(b"", timeout_s=5)
        with ex1.session("print(2)") as s:
            again = s.run_stdin(b"", timeout_s=5)
        assert lost.status == "runtime_error" and "worker died" in lost.error, lost
        assert (again.status, again.stdout) == ("ok", b"2\n")
        assert _template_of(ex1._pool._all[0]).pid != template.pid


# ---------------------------------------------------------------------------------------------- feedback text
ADD = Problem(id="add", prompt="Read a and b, print a + b.", tests=[ProblemTest(kind="stdin", input="1 2\n", output="3")])


def test_feedback_is_text_even_when_the_programs_error_is_not(ex, tmp_path):
    bad = A.FEEDBACK_WRITER.format(markup="", message="\ud800 and more")
    verdict = Grader(ex, time_limit_s=5.0).grade_program(ADD, bad)
    assert verdict.verdict == "runtime_error" and "ValueError: \ufffd and more" in verdict.feedback, verdict.feedback
    verdict.feedback.encode("utf-8")  # (a lone surrogate would raise here)
    # The command line prints it (it exited 1 with UnicodeEncodeError).
    from tests.sandbox.test_cli import opsd, write

    problem = write(tmp_path / "p.json", ADD.model_dump_json())
    res = opsd("check", problem, write(tmp_path / "bad.py", bad))
    assert res.returncode == 0 and "ValueError: \ufffd and more" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("message", ["plain", "\ud800"])
def test_feedback_a_program_writes_never_becomes_the_teachers_control_tokens(ex, message):
    from tests.trainer.chat_tokenizers import build, control_ids
    from trainer.config import ContextConfig
    from trainer.contexts import GradedRollout, teacher_prompts_for_group

    verdict = Grader(ex, time_limit_s=5.0).grade_program(ADD, A.FEEDBACK_WRITER.format(markup=A.MARKUP, message=message))
    assert verdict.verdict == "runtime_error" and A.MARKUP.strip() in verdict.feedback, verdict.feedback
    tok = build("qwen3")
    group = [GradedRollout("```python\nprint(1)\n```", False, verdict.feedback)]
    (ids,), _, _ = teacher_prompts_for_group(tok, group, problem=ADD, context=ContextConfig(name="feedback"))
    template = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, add_generation_prompt=True,
                                       enable_thinking=False)["input_ids"]
    controls = control_ids(tok)
    # The prompt's control tokens are the template's own: one user turn, then the assistant's.
    assert [i for i in ids if i in controls] == [i for i in template if i in controls]


# -------------------------------------------------------------------------------------------- code extraction
def test_a_fence_inside_a_string_is_part_of_the_program(ex):
    response = ("Solution:\n```python\nUSAGE = \'\'\'\nrun it as:\n```\npython main.py < input.txt\n```\n\'\'\'\n"
                "a, b = map(int, input().split())\nprint(a + b)\n```\n")
    verdict = Grader(ex, time_limit_s=5.0).grade(ADD, response)
    assert verdict.verdict == "accepted", verdict.feedback  # (it ran `USAGE = \'\'\'` alone before)


@pytest.mark.parametrize("code_block", ["longest", "last"])
def test_the_block_a_grader_runs_is_the_one_that_defines_the_entry_point(ex, code_block):
    add = Problem(id="add", prompt="", func_name="add", tests=[
        ProblemTest(kind="functional", input="%d\n%d" % (a, b), output=str(a + b)) for a, b in ((1, 2), (5, 7))])
    solution = "```python\ndef add(a, b):\n    return a + b\n```\n"
    prose = "```\nThis adds a and b and returns their sum; it runs in constant time and constant memory.\n```\n"
    decoy = "```python\ndef add_by_counting(a, b):\n    for _ in range(b):\n        a += 1\n    return a\n```\n"
    grader = Grader(ex, code_block=code_block, time_limit_s=5.0)
    for response in (solution + prose, prose + solution, solution + decoy, decoy + solution):
        assert grader.grade(add, response).verdict == "accepted", (code_block, response)


# -------------------------------------------------------------------------------------------------- placement
def test_a_program_cannot_move_to_another_cpu():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nowhere to move")
    with Executor(2, limits=LIMITS, pin_cpus=True) as ex2:
        with ex2.session(A.AFFINITY) as s:
            out = s.run_stdin(b"", timeout_s=5)
    before, after, result = re.match(rb"(\[.*?\]) (\[.*?\]) (.*)", out.stdout.strip()).groups()
    assert out.status == "ok" and len(json.loads(before)) == 1 and before == after and result == b"denied 1", out


# ---------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("actual", ["\uff11\uff12\uff13", "\u0661\u0662\u0663", "1_23", "\U0001d7cf\U0001d7d0\U0001d7d1",
                                    "\u00b9\u00b2\u00b3"])
def test_numbers_compare_as_ascii_decimals_only(actual):
    assert not stdout_matches(actual, "123")
    assert not stdout_matches("5 " + actual, "5 123")
    assert stdout_matches("123.0", "123") and stdout_matches("1.23e2", "123") and stdout_matches("+123", "123")
