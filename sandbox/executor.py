"""Isolated execution of untrusted, model-written Python programs: the public API.

    with Executor(n_workers=2) as ex:
        with ex.session(code) as s:
            s.run_stdin(b"1 2\\n", timeout_s=2.0)          # a fresh run of the program as __main__
            s.call("Solution.add", [1, 2], timeout_s=2.0)    # a function of the program, plain data back

Each worker is a long-lived bubblewrap sandbox holding a warm fork server (``sandbox/runner.py``); every
program runs in its own PID namespace as an unprivileged uid with no capabilities, rlimits and a seccomp
filter (layers and their checks: ``sandbox/isolation.py``, tests/sandbox/test_hostile.py), in a process cloned
from a template that never held another program's data (tests/sandbox/test_integrity.py).

``timeout_s`` of a run or a call is a limit on the CPU time the program spends on it (all its threads and
processes; a call's includes the program's top-level code, which runs again in every call: ``sandbox/runner.py``);
its wall clock is cut at ``WALL_FACTOR`` times that.

Call sessions: each ``call`` is a fresh child of the session's process, which holds the program's code and
never runs it: the child runs the top-level code (and waits for the threads it started that are not daemons),
then that one call, and ends with everything it started; its scratch dir is emptied before the next call. No
state, thread, process or file crosses calls, so no CPU time is pooled across them (``sandbox/calls.py``).
Calls that share one time limit (the calls of one test: ``with s.shared_limit(timeout_s=2.0) as t:
t.call(...)``) run one after another in one such child, the top-level code once before the first, and are
billed together all the CPU time it spends from its start to its end; it ends with the block. An exception
raised by the called function is that call's ``runtime_error`` and the session goes on. A call that ends the
program (time, memory or output limit, an exit, an error in the top-level code, a crash) ends the session for
good: every later call of the session returns that same status at once, without running anything.
``run_stdin`` always starts a fresh program and is not affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import threading
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox import isolation as _isolation
from sandbox.codec import PlainDataError, decode_value, encode_value
from sandbox.feedback import as_text
from sandbox.pool import Pool, Worker, WorkerDied
from sandbox.wire import WALL_FACTOR, capped, known_status

logger = logging.getLogger(__name__)

Status = Literal["ok", "runtime_error", "time_limit", "memory_limit", "output_limit"]
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
# The trusted side's own deadline on a worker's answer, beyond the program's timeout.
_WORKER_GRACE_S = 10.0
_OOM_ERROR = "the program's processes exceeded the memory limit"


class ExecutorError(RuntimeError):
    """The executor cannot provide what was asked (e.g. a missing isolation layer with isolation='full')."""

    user_facing = True


class Limits(BaseModel):
    """Resource limits of one program."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_s: float = Field(10.0, gt=0, description="Wall-clock budget of the whole program: one run_stdin run, or "
                          "every call of a session together, each with its run of the top-level code (time between "
                          "calls not counted).")
    cpu_s: float = Field(10.0, gt=0, description="CPU seconds of each run's or call's process (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=32, description="Address space of each process of the program, in MiB (RLIMIT_AS).")
    output_bytes: int = Field(1 << 20, ge=1, description="Cap on stdout+stderr of one run or one call; the program is killed beyond it.")
    file_bytes: int = Field(1 << 20, ge=0, description="Largest file the program may write in its scratch dir (RLIMIT_FSIZE).")
    n_procs: int = Field(32, ge=1, description="Processes and threads the program may have at once (RLIMIT_NPROC).")


@dataclasses.dataclass
class RunOutcome:
    """One execution of the program as __main__ with the given stdin."""

    status: Status
    exit_code: int | None  # negative: killed by that signal; None when the sandbox killed it (limits)
    stdout: bytes
    stderr: bytes
    wall_s: float
    error: str | None  # runtime errors: type, message, ≤3 frames of the solution's code (made in the sandbox)


@dataclasses.dataclass
class CallOutcome:
    """One call of a function of the program."""

    status: Status
    value: Any  # the decoded return value (plain data) when status == "ok", else None
    stdout: bytes
    stderr: bytes
    wall_s: float
    error: str | None


def _run_on(cpus: int | set[int] | None) -> set[int] | None:
    """Move the calling thread onto ``cpus`` (one CPU: a worker's); returns the CPUs it had, to move it back.
    A session's requests are round trips between this thread and its worker's processes: on one CPU a
    round trip costs a few microseconds, across CPUs tens (an inter-processor interrupt each way; ~80 us on
    the 2-core VM the benchmark ran on)."""
    if cpus is None:
        return None
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpus} if isinstance(cpus, int) else cpus)
        return before
    except OSError:  # a CPU this thread may not use: leave it where it is
        return None


@functools.lru_cache(maxsize=256)
def _as_dict(limits: Limits) -> dict:
    """The limits as sent to a worker (a session reads them, never changes them)."""
    return limits.model_dump()


def _oom_kills(cgroup: Any) -> int | None:
    """The worker cgroup's OOM-kill count; None when it cannot be read."""
    try:
        return cgroup.oom_kills()
    except (OSError, ValueError):
        return None


def _text(x: Any, limit: int = 8000) -> str | None:
    """A text from the worker (an error message the program may have written): cut, and text that can be
    written (``as_text``)."""
    return as_text(x[:limit]) if type(x) is str else None


def _wall(reply: dict, fallback: float) -> float:
    """The wall-clock time a worker reports for a run or call; ``fallback`` (the most it may have taken) when the
    report is malformed, so a bad report never spares the session's budget."""
    w = reply.get("wall_s")
    return float(w) if type(w) in (int, float) and 0 <= w < 1e6 else fallback


class Session:
    """One program inside one worker. Use it from one thread at a time."""

    def __init__(self, worker: Worker, code: str, limits: Limits):
        self._worker, self._code, self._limits = worker, code, limits
        self._limits_dict = _as_dict(limits)
        self._call_wall_s = 0.0
        self._started = False
        self._failure: CallOutcome | None = None
        self._ooms: int | None = None  # the worker cgroup's OOM-kill count when last read (None: unread)
        self._ended = False  # the worker ended the program with the session's last calls
        self._test: SharedLimit | None = None  # the shared limit whose calls are being made
        self._n_tests = 0
        self.worker_died = False

    def _request(self, header: dict, blobs: list[bytes], timeout_s: float) -> tuple[dict | None, bool]:
        """Send one request to the worker: (its reply, or None when the worker died; whether the kernel's OOM
        killer killed a process of the program meanwhile, i.e. together they outgrew the worker's cgroup)."""
        cgroup = self._worker.cgroup
        if cgroup is not None and self._ooms is None:
            self._ooms = _oom_kills(cgroup)
        ooms = self._ooms  # the count after this session's previous request: one read of the cgroup per request
        try:
            reply, out_blobs = self._worker.request(header, blobs, timeout_s=timeout_s + _WORKER_GRACE_S)
        except WorkerDied as e:
            logger.warning("sandbox worker died, it will be replaced: %s", e)
            self.worker_died = True
            return None, False
        if "fatal" in reply:
            raise ExecutorError("sandbox failure: %s" % _text(reply["fatal"]))
        self._last_blobs = out_blobs
        if cgroup is None:
            return reply, False
        self._ooms = _oom_kills(cgroup)
        # Fails closed: a count that could not be read (None) counts as a kill.
        return reply, ooms is None or self._ooms is None or self._ooms > ooms

    def _results(self, reply: dict, n: int, what: str) -> list[dict]:
        """The per-run or per-call results of a batch reply (1 to n of them, two blobs each), checked."""
        results = reply.get("results")
        if type(results) is not list or not 0 < len(results) <= n or not all(
                type(r) is dict for r in results) or len(self._last_blobs) != 2 * len(results):
            raise ExecutorError("sandbox failure: a malformed reply to %d %s" % (n, what))
        return results

    def run_stdin(self, stdin: bytes, *, timeout_s: float) -> RunOutcome:
        """Run the program once as __main__ on ``stdin``; output is captured at the file-descriptor level."""
        return self.run_stdin_many([stdin], timeout_s=timeout_s)[0]

    def run_stdin_many(self, stdins: list[bytes], *, timeout_s: float,
                       stop_after: frozenset[str] | set[str] = frozenset()) -> list[RunOutcome]:
        """Runs of the program, one per stdin, each exactly as ``run_stdin`` would make it (a fresh process,
        its own timeout, output and status), in one request to the worker: each run is a fresh process that
        holds only its own input. Stops after a run whose status is in
        ``stop_after`` (the list is then shorter)."""
        if not stdins:
            return []
        timeout = min(float(timeout_s), self._limits.wall_s)
        header = {"op": "runs", "code": self._code, "limits": self._limits_dict, "timeout": timeout,
                  "wall": min(WALL_FACTOR * timeout, self._limits.wall_s), "stop": sorted(stop_after)}
        # (each run is a new sandbox process: a second of slack per run)
        reply, oom_killed = self._request(header, [bytes(s) for s in stdins],
                                          (header["wall"] + 1.0) * len(stdins))
        if reply is None:
            return [RunOutcome("runtime_error", None, b"", b"", timeout, "the sandbox worker died during the run")
                    for _ in stdins]
        results = self._results(reply, len(stdins), "runs")
        if oom_killed and len(stdins) > 1:
            # The kernel's OOM killer struck during one of these runs, but which? Rare enough to find out
            # by running them again one at a time, each request with its own count.
            outcomes = []
            for stdin in stdins:
                outcomes += self.run_stdin_many([stdin], timeout_s=timeout_s)
                if outcomes[-1].status in stop_after:
                    break
            return outcomes
        outcomes = []
        for i, result in enumerate(results):
            status = known_status(result.get("status"))
            code = result.get("exit_code")
            code = code if type(code) is int else None
            error = _text(result.get("error"))
            if oom_killed:  # a process of this run outgrew the worker's cgroup, the run counts as such
                status, error = "memory_limit", _OOM_ERROR
            out, err = capped(*self._last_blobs[2 * i: 2 * i + 2], self._limits.output_bytes)
            outcomes.append(RunOutcome(status, code, out, err, _wall(result, header["wall"]), error))
        return outcomes

    def call(self, target: str, args: list, *, timeout_s: float) -> CallOutcome:
        """Call ``target`` ("func" or "Solution.method", a fresh Solution() per call) with plain-data args."""
        return self.call_many(target, [args], timeout_s=timeout_s)[0]

    def call_many(self, target: str, args_list: list[list], *, timeout_s: float,
                  last: bool = False) -> list[CallOutcome]:
        """Several calls of ``target`` in order, as many ``call``s would make them (each with its own
        ``timeout_s``, its own output and status; once the program is gone the rest answer with that failure at
        once), in one request to the worker: a test suite costs one round trip instead of one per test.
        ``last``: no call of this session follows; the worker ends the program with the same request (later
        calls answer runtime_error without running)."""
        if self._test is not None:
            raise ExecutorError("a call outside the calls of a shared time limit before it ended")
        return self._call_many(target, args_list, timeout_s=timeout_s, last=last)

    @contextlib.contextmanager
    def shared_limit(self, *, timeout_s: float) -> Iterator["SharedLimit"]:
        """Calls that share one time limit (the calls of one test): ``SharedLimit.call`` makes them one after
        another in ONE fresh process of the program (its top-level code runs once, before the first), billed
        together the CPU time of all its threads and processes from its start to its end, that after the last
        call included; their summed wall-clock time is cut at ``WALL_FACTOR`` times the limit. The process ends
        with everything it started when the block is left; ``SharedLimit.end_status`` then says whether the
        whole stayed within the limit. No other call of the session may be made meanwhile."""
        if self._test is not None:
            raise ExecutorError("shared time limits do not nest")
        self._n_tests += 1
        shared = SharedLimit(self, self._n_tests, float(timeout_s))
        self._test = shared
        try:
            yield shared
        finally:
            self._test = None
            shared._end()

    def _end_test(self, shared: "SharedLimit") -> CallOutcome | None:
        """End a shared limit's process; the failure found then (None: within the limit)."""
        if not shared._started or self._failure is not None:
            return None
        reply, oom_killed = self._request({"op": "end_test", "test": shared._id, "limits": self._limits_dict}, [],
                                          WALL_FACTOR * shared.timeout_s)
        if reply is None:
            return self._fail(CallOutcome("runtime_error", None, b"", b"", 0.0, "the sandbox worker died during the call"))
        status = known_status(reply.get("status"))
        error = _text(reply.get("error"))
        if oom_killed:
            status, error = "memory_limit", _OOM_ERROR
        if status == "ok":
            return None
        return self._fail(CallOutcome(status, None, b"", b"", 0.0, error))

    def _call_many(self, target: str, args_list: list[list], *, timeout_s: float, last: bool = False,
                   test: int | None = None) -> list[CallOutcome]:
        if not _TARGET.match(target):
            raise ValueError("call target must be 'name' or 'Class.name', got %r" % (target,))
        try:
            args_texts = [encode_value(list(args)) for args in args_list]
        except PlainDataError as e:
            raise ValueError("call arguments must be plain data: %s" % e) from None
        outcomes: list[CallOutcome] = []
        left = self._limits.wall_s - self._call_wall_s
        if self._failure is None and left <= 0 and args_texts:
            self._fail(CallOutcome("time_limit", None, b"", b"", 0.0, "the session's wall-clock budget is used up"))
        if self._failure is None and args_texts:
            timeout = min(float(timeout_s), left)
            header = {"op": "call", "calls": [{"target": target, "args": a, "timeout": timeout} for a in args_texts],
                      "budget": left, "limits": self._limits_dict}
            if test is not None:
                header["test"] = test
            if not self._started:  # the worker keeps the program's code for the session's later calls
                header["code"] = self._code
            self._started = True
            if last:
                header["end"] = True
            reply, oom_killed = self._request(header, [], min(left, WALL_FACTOR * timeout * len(args_texts)))
            if reply is None:
                self._fail(CallOutcome("runtime_error", None, b"", b"", timeout, "the sandbox worker died during the call"))
            else:
                results = self._results(reply, len(args_texts), "calls")
                if oom_killed:  # the first call that failed (or the last one) saw the kill
                    i = next((i for i, r in enumerate(results) if r.get("status") != "ok"), len(results) - 1)
                    results[i] = dict(results[i], status="memory_limit", error=_OOM_ERROR)
                for i, result in enumerate(results):
                    outcomes.append(self._outcome(result, self._last_blobs[2 * i: 2 * i + 2]))
                    if self._failure is not None:
                        break
                if last and self._failure is None:
                    self._ended = True
                    self._fail(CallOutcome("runtime_error", None, b"", b"", 0.0, "the session's program was ended"))
        failure = self._failure
        while len(outcomes) < len(args_texts):
            outcomes.append(CallOutcome(failure.status, None, b"", b"", 0.0, failure.error))
        return outcomes

    def _outcome(self, result: dict, blobs: list[bytes]) -> CallOutcome:
        """The outcome of one call from the worker's result; a program now gone fails the session."""
        wall = _wall(result, self._limits.wall_s)
        self._call_wall_s += wall
        status = known_status(result.get("status"))
        out, err = capped(*blobs, self._limits.output_bytes)
        error, value = _text(result.get("error")), None
        if status == "ok":
            try:
                value = decode_value(result.get("value") if type(result.get("value")) is str else "")
            except PlainDataError as e:
                status, error = "runtime_error", "the returned value could not be decoded: %s" % e
        outcome = CallOutcome(status, value, out, err, wall, error)
        if status in ("time_limit", "memory_limit", "output_limit") or result.get("ended") is True:
            self._fail(outcome)  # the program is gone: later calls answer at once with this failure
        return outcome

    def _fail(self, outcome: CallOutcome) -> CallOutcome:
        self._failure = outcome
        return outcome

    def _finish(self) -> None:
        """End the session's program (if any) so the worker is clean for the next session."""
        if self._started and not self.worker_died and not self._ended:
            try:
                self._worker.request({"op": "end"}, [], timeout_s=_WORKER_GRACE_S)
            except WorkerDied:
                self.worker_died = True


class SharedLimit:
    """Calls of a session's program that share one time limit (``Session.shared_limit``)."""

    def __init__(self, session: Session, test_id: int, timeout_s: float):
        self._session, self._id, self.timeout_s = session, test_id, timeout_s
        self._started = False  # a call was sent
        self.end_status: CallOutcome | None = None  # set when the block is left: the failure found at the end

    def call(self, target: str, args: list) -> CallOutcome:
        """Call ``target`` as ``Session.call`` does, billed to the shared limit."""
        return self.call_many(target, [args])[0]

    def call_many(self, target: str, args_list: list[list]) -> list[CallOutcome]:
        """Several calls, one request to the worker (as ``Session.call_many``), billed to the shared limit."""
        if self._session._test is not self:
            raise ExecutorError("a call of a shared time limit after it ended")
        self._started = self._started or bool(args_list)
        return self._session._call_many(target, args_list, timeout_s=self.timeout_s, test=self._id)

    def _end(self) -> None:
        self.end_status = self._session._end_test(self)


class Executor:
    """A pool of warm, isolated workers running untrusted programs. ``session`` is thread-safe."""

    def __init__(self, n_workers: int | None = None, *, isolation: Literal["auto", "full", "none"] = "auto",
                 limits: Limits = Limits(), disable: frozenset[str] | set[str] = frozenset(),
                 pin_cpus: bool | None = None):
        """``disable`` turns off named layers (tests use it to check that each layer holds on its own).
        ``pin_cpus``: worker i and its programs run on the i-th CPU this process may use (round robin), and a
        thread holding a session runs on its worker's CPU meanwhile (moved back after), so every round trip
        of a session stays on one CPU. None (the default) pins when the workers cover every CPU this process
        may use (as here, or in a job given its own CPUs), and leaves placement to the scheduler on a larger
        shared node, where other executors (other trials) would pin to the same first CPUs."""
        if isolation not in ("auto", "full", "none"):
            raise ExecutorError("isolation must be 'auto', 'full' or 'none', got %r" % (isolation,))
        unknown = set(disable) - set(_isolation.LAYERS)
        if unknown:
            raise ExecutorError("unknown isolation layers to disable: %s" % sorted(unknown))
        self.limits = limits
        self.n_workers = max(1, n_workers or os.cpu_count() or 1)
        plan = _isolation.make_plan(isolation, frozenset(disable))
        required_missing = {k: v for k, v in plan.missing.items() if k != "cgroup"}
        if isolation == "full" and required_missing:
            raise ExecutorError("isolation='full' but layers are unavailable: " +
                                "; ".join("%s (%s)" % kv for kv in plan.missing.items()))
        probe_limits = Limits(wall_s=10, cpu_s=10, memory_mb=1024).model_dump()
        tmpfs = max(64 << 20, 8 * limits.file_bytes)
        cpus = sorted(os.sched_getaffinity(0))  # the CPUs this process may use
        if not (pin_cpus or (pin_cpus is None and self.n_workers >= len(cpus))):
            cpus = []
        self._pool = Pool(self.n_workers, lambda i: Worker(plan, probe_limits, tmpfs, cpus[i % len(cpus)] if cpus else None))
        worker_layers = self._pool.layers
        report = {
            "bwrap": plan.bwrap is not None,
            "seccomp": plan.bpf is not None and worker_layers.get("seccomp", False),
            "pid_namespace": plan.pidns and worker_layers.get("pid_namespace", False),
            "uid_drop": plan.drop is not None and worker_layers.get("uid_drop", False),
            "rlimits": True,
            "cgroup": bool(plan.cgroup) and worker_layers.get("cgroup", False),
        }
        for layer, ok in report.items():
            if not ok and layer not in plan.missing:
                plan.missing[layer] = "failed the worker's self-test"
        self._report = report
        self._closed = False
        self._lock = threading.Lock()
        if isolation == "none":
            logger.warning("SANDBOX ISOLATION IS OFF (isolation='none'): untrusted programs run with only "
                           "rlimits and time limits, as a process of this user. For debugging only.")
        elif isolation == "full" and not all(v for k, v in report.items() if k != "cgroup"):
            self.close()
            raise ExecutorError("isolation='full' but layers failed: %s" % plan.missing)
        else:
            logger.info("sandbox: %d workers, interpreter %s, layers: %s", self.n_workers, plan.python,
                        ", ".join("%s=%s" % (k, "on" if v else "OFF") for k, v in report.items()))
            for layer, why in plan.missing.items():
                logger.warning("sandbox isolation layer MISSING: %s (%s)", layer, why)
        # The start-up line on which limits hold (a warning when the cgroup layer is missing).
        self.limits_line = None if isolation == "none" else _isolation.limits_line(
            report, plan.cgroup if report["cgroup"] else None, plan.missing.get("cgroup"), pinned=bool(cpus))
        if self.limits_line is not None:
            logger.log(logging.INFO if report["cgroup"] else logging.WARNING, "%s", self.limits_line)

    def isolation_report(self) -> dict[str, bool]:
        """Which layers are active: bwrap, seccomp, pid_namespace, uid_drop, rlimits, and cgroup (optional:
        a memory+pids cgroup per worker capping all of a program's processes together)."""
        return dict(self._report)

    @contextlib.contextmanager
    def session(self, code: str, *, limits: Limits | None = None) -> Iterator[Session]:
        """Lend a worker for one program; blocks until one is free."""
        if self._closed:
            raise ExecutorError("the executor is closed")
        worker = self._pool.acquire()
        limits = limits or self.limits
        try:
            worker.apply_limits(limits.memory_mb, limits.n_procs, limits.file_bytes)
        except OSError as e:
            self._pool.release(worker)
            raise ExecutorError("could not set the worker's cgroup limits: %s" % e) from None
        session = Session(worker, code, limits)
        pinned = _run_on(worker.cpu)
        try:
            yield session
        finally:
            session._finish()
            _run_on(pinned)
            self._pool.release(worker)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._pool.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

