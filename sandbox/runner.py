"""The fork server: the process inside each sandbox worker that starts and watches programs (stdlib only).

The executor starts ``python -I -S -c <boot>`` inside bubblewrap (``sandbox/pool.py:worker_source``: it loads
codec, wire, confine, program and this module). The fork server pre-imports the modules programs commonly
use, reads its configuration, makes itself non-dumpable (no process of its uid may read its memory or open
its descriptors through /proc), then forks its TEMPLATE, before it reads any request: a pristine copy of itself
that only ever receives the descriptors of the next program's process and its limits. Every program's process
(B) is a clone of the template, so it holds no other program's source, input or output and no request of the
trusted process; CLONE_PARENT makes it a child of the fork server, which waits for it, reads its rusage
and its CPU clock. B is PID 1 of a fresh PID namespace (when B dies the kernel kills every process the
program started); it confines itself (``sandbox/confine.py``), then reads its code and one input at a time
(``sandbox/program.py``).

The fork server serves one request at a time from the trusted process on fds 0/1 (frames: ``sandbox/wire.py``):
a program's stdin runs (each a fresh B: no run sees another's input or outlives it) or a call session's
calls (one B per session, each call's arguments sent when the call is made). It reads B's pipes itself and
enforces the output cap, the cap on B's response frames, and each run's or call's limit on the CPU time the
program spends in it, with the wall clock as a backstop (``WALL_FACTOR``). Nothing it sends back is trusted
by the executor.

A test's CPU time is its own. A session's B holds the program's code but never runs it: each call, or the calls
of one test (``test``: a check test's calls share one time limit), is a fresh child of B that runs the
top-level code, then the call or the test's calls, and ends; B then kills and reaps whatever it left and
empties the scratch dir before it reports the call (the test's end) done (``sandbox/calls.py``). So nothing a
test computed (in a global, a file, a thread, a process) is there for the next, and the only way to pass a
hard test is to solve it within its limit. A call is billed the CPU time of B's whole tree (B, its children,
what they waited for) from the end of the last call to B's report, read once B is alone again (one thread, no
process below it; a report with B not alone ends the session); the calls of a test are billed together, each
against the test's one limit, the CPU time since the test started, and the test's end (``do_end_test``) bills
what its processes spent after its last call too (over the limit: ``time_limit``). Between tests, B's own
CPU time must be nil (``IDLE_CPU_S``, else the session ends). The top-level code's CPU time counts
against every call or test (module-level precomputation runs again in each). Every reading of the program's
CPU time fails closed (``Program.cpu``).

Why one module of ~700 lines: the request loop, the bookkeeping of B's processes and pipes and the CPU-time
accounting share the server's state at every step of a call; the parts that stand alone (frames, confinement,
the program's side, the template) are their own modules already.
"""

import io
import json
import os
import resource
import select
import signal
import sys
import time

from sandbox.confine import NOBODY, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, STACK_BYTES, Prepared, check_syscall, libc, prepare_streams
from sandbox.template import Template, TemplateGone
from sandbox.wire import (
    MAX_PROGRAM_FRAME,
    STATUSES,
    WALL_FACTOR,
    FrameReader,
    capped,
    known_status,
    pack_frame,
    read_frame,
    write_all,
)

# Not threading, random (nor queue, statistics, tempfile, which import them): their at-fork hooks would run in
# every program's process (threading's alone costs more than a third of a fork's copy-on-write faults); the
# programs that use them import them, about a millisecond.
PRELOAD = (
    "abc array bisect calendar cmath collections contextlib copy dataclasses datetime decimal enum fractions "
    "fcntl functools hashlib heapq itertools json math numbers operator re string "
    "textwrap traceback types typing unicodedata linecache"
).split()

_CPUCLOCK_SCHED = 2


def classify_end(code, cpu, maxrss_kb, frame, limits, timeout):
    """Status, exit code and error of a program process that ended: over its CPU time limit first, then its own
    report (an error frame), then its exit status, CPU time and peak memory."""
    if cpu > timeout:
        return "time_limit", code, None
    if frame and frame.get("status") in STATUSES:
        return frame["status"], code, frame.get("error")
    if code == 0:
        return "ok", 0, None
    if code > 0:
        return "runtime_error", code, "the program exited with code %d" % code
    sig = -code
    if sig == signal.SIGXCPU or cpu >= limits["cpu_s"]:
        return "time_limit", code, None
    if maxrss_kb * 1024 >= 0.9 * (limits["memory_mb"] << 20):
        return "memory_limit", code, None
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = str(sig)
    return "runtime_error", code, "the program was killed by signal %s" % name


# ------------------------------------------------------------------------------------------- the fork server
class Program:
    """The fork server's handle on one program process B and its pipes."""

    def __init__(self, pid, out_fd, err_fd, req_fd, resp_fd, scratch, relayed=False):
        self.pid, self.pidfd = pid, os.pidfd_open(pid)
        # B's /proc files, opened when first read and kept open (re-read from offset 0): a session's CPU time
        # is read at every call's start and end; a short run's never.
        self.stat_fd = self.children_fd = None
        self.quiet_since, self.waited_ticks, self.alone = None, 0, True  # (``cpu``)
        self.clock = ((~pid) << 3) | _CPUCLOCK_SCHED  # B's CPU time, all its threads
        self.cpu_mark = 0.0  # B's CPU time (its whole tree's) when its last call ended (0: B's whole life)
        self.out_fd, self.err_fd, self.req_fd, self.resp_fd = out_fd, err_fd, req_fd, resp_fd
        self.scratch = scratch
        self.status = None  # wait status once reaped
        self.rusage = None
        # B's reports; in a call session, a call's answer is the program's own frame, which B relays (None once
        # the channel held something that is not a frame).
        self.frames = FrameReader(MAX_PROGRAM_FRAME, relayed=relayed)
        self.discarded = 0  # bytes B wrote on its response channel after that

    def cpu(self):
        """The CPU time the program has spent so far: B's threads, every process below B (the program's
        children, grandchildren, orphans: all stay below B, PID 1 of their namespace) and the children each
        of them has waited for. Also notes whether B was alone (``self.alone``: one thread, no live process
        below it). The walk of /proc is skipped while it would find what it found last time: B alone, and no
        task made in the worker since (its last pid unchanged).

        Fails closed: a walk during which a task it listed ended (a thread's children move to another
        thread, a process's CPU time to its reaper: either may be missed) is made again, and when
        ``_WALK_TRIES`` walks in a row are disturbed, or B's files cannot be read while B lives, the reading
        is infinite (the caller's limit is exceeded)."""
        for _ in range(_WALK_TRIES):
            try:
                return self._walk()
            except (_Vanished, OSError, ValueError, IndexError):
                if self.reap(block=False) is not None:  # B has ended: its rusage says it all
                    self.alone = True
                    return self.rusage.ru_utime + self.rusage.ru_stime
        self.alone, self.quiet_since = False, None
        return float("inf")

    def _walk(self):
        own = time.clock_gettime(self.clock)
        last_pid = os.pread(_LAST_PID_FD, 32, 0) if _LAST_PID_FD is not None else None
        if last_pid is not None and last_pid == self.quiet_since:
            return own + self.waited_ticks / _TICKS
        if self.stat_fd is None:
            self.stat_fd = os.open("/proc/%d/stat" % self.pid, os.O_RDONLY)
            self.children_fd = os.open("/proc/%d/task/%d/children" % (self.pid, self.pid), os.O_RDONLY)
        _, waited, threads, _ = _stat_cpu(os.pread(self.stat_fd, 4096, 0))
        todo = (_children(self.pid, threads) if threads > 1 else
                [int(c) for c in os.pread(self.children_fd, 1 << 16, 0).split()])
        ticks, alone = waited, threads == 1
        while todo:  # the processes below B (rare: most programs start none)
            pid = todo.pop()
            ran, waited, threads, state = _stat_cpu(_read_proc("/proc/%d/stat" % pid))
            todo.extend(_children(pid, threads))
            ticks += ran + waited
            alone = alone and state == b"Z"  # an ended process not yet waited for computes nothing
        self.alone = alone
        self.quiet_since, self.waited_ticks = (last_pid if alone else None), ticks
        return own + ticks / _TICKS

    def reap(self, block=True):
        if self.status is None:
            pid, status, rusage = os.wait4(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status, self.rusage = status, rusage
        return self.status

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap()

    def close(self, server):
        self.kill()
        for fd in (self.pidfd, self.out_fd, self.err_fd, self.req_fd, self.resp_fd, self.stat_fd, self.children_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pidfd = self.out_fd = self.err_fd = self.req_fd = self.resp_fd = self.stat_fd = self.children_fd = None
        server.remove_scratch(self.scratch)


_TICKS = os.sysconf("SC_CLK_TCK")
_WALK_TRIES = 16  # disturbed walks in a row before a reading counts as infinite (``Program.cpu``)
# A session's B runs nothing of the program between calls: CPU time it spends there beyond this ends the session.
IDLE_CPU_S = 0.01
GARBLED = {"status": "runtime_error", "error": "garbled response from the program", "fatal": True}
_LAST_PID_FD = None  # /proc/sys/kernel/ns_last_pid, opened by the fork server (``ForkServer.__init__``)


class _Test:
    """A test whose calls share one time limit (``ForkServer.do_call``)."""

    def __init__(self, test_id, limit):
        self.id, self.limit = test_id, limit
        self.wall = 0.0  # the wall-clock time of its calls so far
        self.billed = 0.0  # the CPU time billed to it at its last call


def _program_answer(raw):
    """A call's answer, the header of the frame the program wrote: a JSON object (and no blobs), else garbled."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        return dict(GARBLED)
    if type(answer) is not dict or answer.get("blobs", []) != []:
        return dict(GARBLED)
    return answer


def _read_proc(path):
    """A /proc file's text; _Vanished when its task has ended."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        raise _Vanished(path) from None
    try:
        return os.read(fd, 1 << 16)
    except ProcessLookupError:
        raise _Vanished(path) from None
    finally:
        os.close(fd)


def _stat_cpu(stat):
    """(utime + stime, cutime + cstime in clock ticks, threads, state) from a /proc/<pid>/stat text."""
    fields = stat.rsplit(b")", 1)[1].split()  # fields 3, 14-17 and 20 of stat: 0, 11-14 and 17 after the name
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]), int(fields[17]), fields[0]


class _Vanished(Exception):
    """A task listed during a walk of the program's processes ended before it was read."""


def _children(pid, threads):
    """The children of every thread of process ``pid``; _Vanished when a task ended meanwhile."""
    try:
        tasks = [str(pid)] if threads == 1 else os.listdir("/proc/%d/task" % pid)
        return [int(c) for task in tasks for c in _read_proc("/proc/%d/task/%s/children" % (pid, task)).split()]
    except (FileNotFoundError, ProcessLookupError):
        raise _Vanished(pid) from None


def _sealed_memfd(data):
    """A read-only file holding ``data``: a program's stdin (it can read and seek it, not grow it)."""
    import fcntl

    fd = os.memfd_create("stdin", os.MFD_ALLOW_SEALING)
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class ForkServer:
    def __init__(self, cfg):
        global _LAST_PID_FD
        self.cfg = cfg
        self.template = Template(cfg)
        try:  # the last pid given out in the worker's PID namespace (any process or thread made there moves it)
            _LAST_PID_FD = os.open("/proc/sys/kernel/ns_last_pid", os.O_RDONLY)
        except OSError:
            pass
        self.session = None  # Program of the current call session
        self.session_failure = None
        self.test = None  # _Test whose calls are being made (``do_call``)
        self.n_scratch = 0  # scratch dirs made (their names, without mounts)

    # --- scratch dirs: a tmpfs in the program's own mount namespace, or a directory removed afterwards
    def make_scratch(self):
        if self.cfg["mounts"]:
            return "/tmp"
        while True:  # (tempfile would import random into the server: see PRELOAD)
            self.n_scratch += 1
            path = os.path.join(self.cfg["scratch_root"], "p%d" % self.n_scratch)
            try:
                os.mkdir(path, 0o700)
                break
            except FileExistsError:  # a program of this worker made it
                continue
        if self.cfg["drop"] == "setuid":
            os.chown(path, NOBODY, NOBODY)
        return path

    def remove_scratch(self, path):
        if not self.cfg["mounts"]:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            if self.cfg.get("wipe_scratch_root"):  # a writable /tmp shared by the worker's programs
                keep = {self.session.scratch} if self.session is not None else set()
                for name in os.listdir(self.cfg["scratch_root"]):
                    p = os.path.join(self.cfg["scratch_root"], name)
                    if p in keep:
                        continue
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        try:
                            os.unlink(p)
                        except OSError:
                            pass

    def spawn(self, limits, mode, code, stdin=b""):
        """A program's process B from the template: "run" (once as __main__ on ``stdin``) or "session"
        (``sandbox/calls.py``: a child per call). B sets itself up, then reads ``code`` from its request channel. Returns B's
        handle (a direct child)."""
        scratch = self.make_scratch()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        resp_r, resp_w = os.pipe()
        req_r, req_w = os.pipe()
        in_fd = _sealed_memfd(stdin) if mode == "run" else os.open(os.devnull, os.O_RDONLY)
        child_fds = (in_fd, out_w, err_w, req_r, resp_w)
        try:
            pid = self.template.spawn({"limits": limits, "mode": mode, "scratch": scratch}, child_fds)
        except TemplateGone:
            raise
        except BaseException as e:
            for fd in (out_r, err_r, resp_r, req_w):
                os.close(fd)
            self.remove_scratch(scratch)
            raise RuntimeError("could not start the program: %s: %s" % (type(e).__name__, e)) from None
        finally:
            for fd in child_fds:
                os.close(fd)
        prog = Program(pid, out_r, err_r, req_w, resp_r, scratch, relayed=mode == "session")
        try:
            write_all(req_w, pack_frame({"code": code}))
        except OSError:
            pass  # B is gone (its set-up failed): pump reports it
        for fd in (out_r, err_r, resp_r):
            os.set_blocking(fd, False)
        return prog

    def pump(self, prog, timeout, wall, cap, out, err, want_frame, spent=0.0):
        """Read B's pipes until a response frame (want_frame), B's exit, the program's CPU time since
        ``prog.cpu_mark`` reaches ``timeout``, ``wall`` seconds pass, or the output cap. ``spent``: the CPU time
        since the mark at its last reading (a test's earlier calls).

        Returns "frame", "exit", "timeout" or "output"; the first frame B sent is left in ``self.frame``."""
        self.frame = self.answer = None
        deadline = time.monotonic() + wall
        n_cpus = max(1, len(os.sched_getaffinity(0)))  # how fast B's threads can spend CPU time
        fds = {prog.out_fd: out, prog.err_fd: err}
        poller = select.poll()
        for fd in (prog.out_fd, prog.err_fd, prog.resp_fd, prog.pidfd):
            poller.register(fd, select.POLLIN)
        exited = False
        # The program's CPU time is read (a walk of its processes) only when it could have used up its limit:
        # at most n_cpus seconds of it per second. The caller bills what it used in the end.
        next_check = time.monotonic() + max(0.0, timeout - spent) / n_cpus
        while True:
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if now >= next_check:
                used = prog.cpu() - prog.cpu_mark
                if used >= timeout:
                    return "timeout"
                next_check = now + max(0.001, (timeout - used) / n_cpus)
            wait = 0 if exited else max(1, int((min(deadline, next_check) - now) * 1000) + 1)
            events = poller.poll(wait)
            if not events and exited:
                return "exit"
            for fd, _ in events:
                if fd == prog.pidfd:
                    exited = True  # drain what is left in the pipes, then report the exit
                    poller.unregister(fd)
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    poller.unregister(fd)
                    continue
                if fd == prog.resp_fd:
                    if prog.frames is None:  # garbled before: the rest is counted, not kept
                        prog.discarded += len(chunk)
                        if prog.discarded > MAX_PROGRAM_FRAME:
                            return "output"
                        continue
                    try:
                        frames = prog.frames.feed(chunk)
                    except Exception:  # noqa: BLE001 - whatever the program wrote there, it is not a frame
                        prog.frames = None
                        frames = [(dict(GARBLED), [])]
                    for header, blobs in frames:
                        if not want_frame:
                            self.frame = header if self.frame is None else self.frame
                        elif header.get("program_frame"):  # the call's answer, as the program wrote it
                            self.answer = _program_answer(blobs[0]) if self.answer is None else self.answer
                        elif "answer" not in header:  # B's last word on the call: done (or set-up failed)
                            self.frame = header
                            self._drain(prog, out, err, cap)
                            return "output" if len(out) + len(err) > cap else "frame"
                    continue
                fds[fd] += chunk
                if len(out) + len(err) > cap:
                    return "output"

    def _drain(self, prog, out, err, cap):
        for fd, buf in ((prog.out_fd, out), (prog.err_fd, err)):
            while len(out) + len(err) <= cap:
                try:
                    chunk = os.read(fd, 1 << 16)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                buf += chunk

    def verdict(self, prog, reason, limits, timeout):
        """Status, exit code and error of a finished (or to-be-killed) program."""
        if reason in ("timeout", "output"):
            prog.kill()
            status = "time_limit" if reason == "timeout" else "output_limit"
            return status, None, None
        prog.reap()
        frame = self.frame
        if frame and "setup_error" in frame:  # (the worker's self-test catches setup that always fails)
            return "runtime_error", os.waitstatus_to_exitcode(prog.status), "sandbox setup failed: %s" % (frame["setup_error"],)
        rusage = prog.rusage
        return classify_end(os.waitstatus_to_exitcode(prog.status), rusage.ru_utime + rusage.ru_stime,
                            rusage.ru_maxrss, frame, limits, timeout)

    # --- requests
    def do_runs(self, req, blobs):
        """Runs of the program, one per stdin blob, each a fresh process from the template as __main__ with its
        own limits: no run holds another's input, none outlives its turn. Stops after a run whose status is
        in ``stop`` (the caller would skip the rest). One result and two blobs (stdout, stderr) per run."""
        limits, timeout = req["limits"], req["timeout"]
        wall, cap = req.get("wall", WALL_FACTOR * timeout), limits["output_bytes"]
        stop = set(req.get("stop", ()))
        results, out_blobs = [], []
        for stdin in blobs:
            out, err = bytearray(), bytearray()
            started = time.monotonic()
            prog = self.spawn(limits, "run", req["code"], stdin)
            try:
                reason = self.pump(prog, timeout, wall, cap, out, err, want_frame=False)
                status, code, error = self.verdict(prog, reason, limits, timeout)
            finally:
                prog.close(self)
            results.append({"status": status, "exit_code": code, "error": error,
                            "wall_s": time.monotonic() - started})
            out_blobs += capped(out, err, cap)
            if status in stop:
                break
        return {"results": results}, out_blobs

    def do_calls(self, req, blobs):
        """Calls of the session's program, one after another, each with its own limits, within the session's
        remaining wall-clock budget; stops at the first call after which the program is gone. One result
        (and two blobs: stdout, stderr) per call made. The program receives each call's arguments when the
        call is made, never a later call's."""
        limits, budget = req["limits"], req["budget"]
        results, out_blobs = [], []
        for call in req["calls"]:
            if budget <= 0:
                error = "the session's wall-clock budget is used up"
                self.end_session(failure={"status": "time_limit", "error": error, "exit_code": None})
            result, out, err = self.do_call(limits, req.get("code"), call["target"], call["args"],
                                            call["timeout"], budget, req.get("test"))
            budget -= result["wall_s"]
            results.append(result)
            out_blobs += [out, err]
            if result["ended"]:
                break
        if req.get("end"):  # the caller has no further calls: the program ends before the reply
            self.end_session()
        return {"results": results}, out_blobs

    def do_call(self, limits, code, target, args, timeout, budget, test=None):
        """One call; ``test`` (a number the caller gives) marks a call of a test whose calls share one time limit
        (the first call's ``timeout``): its first call starts the test, every call until ``do_end_test`` runs in
        the same child of B and is billed the CPU time of B's whole tree since the test started."""
        started = time.monotonic()
        if self.session_failure is not None:
            return dict(self.session_failure, value=None, wall_s=0.0, ended=True), b"", b""
        if self.test is not None and self.test.id != test:
            raise ValueError("a call outside test %s before it ended" % (self.test.id,))
        if self.session is None:
            if code is None:
                raise ValueError("call without a program: the session's program was already ended")
            self.session = self.spawn(limits, "session", code)
        elif self.test is None and self.session.cpu() - self.session.cpu_mark > IDLE_CPU_S:
            # B ran between calls (a test's calls aside, which are billed to the test): it must not
            error = "the program used CPU time between calls"
            self.end_session(failure={"status": "runtime_error", "error": error, "exit_code": None})
            return dict(self.session_failure, value=None, wall_s=time.monotonic() - started, ended=True), b"", b""
        prog = self.session
        if test is not None and self.test is None:
            self.test = _Test(test, timeout)
        shared = self.test
        out, err = bytearray(), bytearray()
        request = {"target": target, "args": args}
        if shared is not None:
            request["keep"] = 1
            timeout = shared.limit
        try:
            write_all(prog.req_fd, pack_frame(request))
        except OSError:
            pass  # B is gone: pump reports its exit
        wall = min(WALL_FACTOR * timeout - (shared.wall if shared else 0.0), budget)
        reason = self.pump(prog, timeout, wall, limits["output_bytes"], out, err, want_frame=True,
                           spent=shared.billed if shared else 0.0)
        value = None
        if reason == "frame":
            status, error, value, fatal = self._call_end(prog, self.frame, self.answer, limits, timeout, shared)
            if fatal or status in ("memory_limit", "time_limit"):
                self.end_session(failure={"status": status, "error": error, "exit_code": None})
        else:
            status, code, error = self.verdict(prog, reason, limits, float("inf"))
            if status == "ok":  # it exited without answering: no value to give
                status = "runtime_error"
            if error is None and status == "runtime_error":
                error = "the program ended during the call (exit code %s)" % (code,)
            self.end_session(failure={"status": status, "error": error, "exit_code": code})
        cap = limits["output_bytes"]
        wall_s = time.monotonic() - started
        if shared is not None:
            shared.wall += wall_s
        result = {"status": status, "error": error, "value": value, "wall_s": wall_s, "ended": self.session is None}
        return (result, *capped(out, err, cap))

    @staticmethod
    def _call_end(prog, final, answer, limits, timeout, shared=None):
        """(status, error, value, fatal) of a call B reported on: ``final`` its last word (done, or its set-up
        failed), ``answer`` what the program answered. The call is billed the CPU time of B's whole tree since
        the last call ended, read now that B is alone again: the CPU time of every process the call made. A call
        of a test (``shared``) is billed, with the test's earlier calls, the CPU time since the test started: its
        process lives on for the test's next call."""
        cpu = prog.cpu()
        used = cpu - prog.cpu_mark
        if shared is None:
            prog.cpu_mark = cpu
        else:
            shared.billed = used
        if "setup_error" in final:
            return "runtime_error", "sandbox setup failed: %s" % (final["setup_error"],), None, True
        if not final.get("done"):  # the channel was garbled
            return "runtime_error", final.get("error"), None, True
        if not prog.alone and shared is None:  # B reaps every process of the call before it reports: never, unless it failed
            return "runtime_error", "the program's processes outlived its call", None, True
        if "status" in final:  # B's own report on the code (it does not compile)
            status = known_status(final["status"])
            return status, final.get("error"), None, True
        if "ended" in final or answer is None:  # the call's process ended without a whole answer
            code = final.get("ended")
            code = code if type(code) is int else None
            maxrss = final.get("maxrss") if type(final.get("maxrss")) is int else 0
            status, _, error = classify_end(code if code is not None else 1, used, maxrss, None, limits, timeout)
            if status == "ok":  # it exited without answering: no value to give
                status = "runtime_error"
            if error is None and status == "runtime_error":
                error = "the program ended during the call (exit code %s)" % (code,)
            return status, error, None, True
        if used > timeout:  # answered, but spent more than its time on it
            return "time_limit", None, None, True
        status = known_status(answer.get("status"))
        return status, answer.get("error"), answer.get("value"), bool(answer.get("fatal"))

    def do_end_test(self, req):
        """End the test whose calls share one time limit (``do_call``): B ends its child and every process below
        B. The test is billed the CPU time of B's whole tree from its start until B is alone again, what its
        processes spent after its last call included: over the limit, the test's status is ``time_limit`` (and
        the session ends, as after any time limit). What they wrote since the last call is dropped."""
        shared, prog = self.test, self.session
        if shared is None or prog is None:  # no call of the test was made, or the session ended since
            return {"status": "ok", "error": None, "ended": prog is None}, []
        if shared.id != req.get("test"):
            raise ValueError("end of test %s while test %s is open" % (req.get("test"), shared.id))
        self.test = None
        try:
            write_all(prog.req_fd, pack_frame({"end": 1}))
        except OSError:
            pass  # B is gone: pump reports its exit
        out, err = bytearray(), bytearray()
        reason = self.pump(prog, shared.limit, WALL_FACTOR * shared.limit, req["limits"]["output_bytes"], out, err,
                           want_frame=True, spent=shared.billed)
        status, error = "ok", None
        if reason == "frame":
            cpu = prog.cpu()
            used, prog.cpu_mark = cpu - prog.cpu_mark, cpu
            if not self.frame.get("done") or "status" in self.frame or not prog.alone:
                status, error = "runtime_error", "the program's processes outlived its test"
            elif used > shared.limit:
                status = "time_limit"
        elif reason == "exit":
            status, error = "runtime_error", "the program ended after its test's last call"
        else:
            status = "time_limit" if reason == "timeout" else "output_limit"
        if status != "ok":
            self.end_session(failure={"status": status, "error": error, "exit_code": None})
        return {"status": status, "error": error, "ended": self.session is None}, []

    def end_session(self, failure=None):
        self.test = None
        if self.session is not None:
            self.session.close(self)
            self.session = None
        self.session_failure = failure

    def self_test(self):
        """Run a probe program with every layer applied and report what it saw."""
        probe = (
            "import os, ctypes\n"
            "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.syscall(425, 1, None)\n"
            "print(os.getpid(), os.getuid(), int(st['CapEff'], 16), st['Seccomp'].strip(), ctypes.get_errno())\n"
        )
        limits = dict(self.cfg["probe_limits"])
        reply, (out, err) = self.do_runs({"limits": limits, "timeout": 10.0, "code": probe}, [b""])
        reply = reply["results"][0]
        if reply["status"] != "ok":
            return {"error": "probe failed: %s %s" % (reply, err[-500:].decode("utf-8", "replace"))}
        pid, uid, capeff, seccomp, errno_ = out.split()
        return {
            "pid_namespace": int(pid) == 1,
            "uid_drop": int(uid) != 0 and int(capeff) == 0,
            "seccomp": seccomp == b"2" and int(errno_) == 1,  # io_uring_setup denied with EPERM
        }


def serve():
    # A large main-thread stack needs the rlimit at exec time (the kernel then leaves room below it).
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < STACK_BYTES and os.environ.get("OPSD_REEXEC") != "1":
        want = STACK_BYTES if hard == resource.RLIM_INFINITY else min(hard, STACK_BYTES)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_STACK, (want, hard))
            os.environ["OPSD_REEXEC"] = "1"
            argv = [a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\0")[:-1]]
            os.execv(sys.executable, argv)
    os.environ.pop("OPSD_REEXEC", None)
    import builtins

    def _quit(code=None):  # what site.py would add; the interpreter runs with -S
        raise SystemExit(code)

    builtins.exit = builtins.quit = _quit
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    c = libc()
    c.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    import gc

    gc.collect()
    gc.freeze()  # forked programs' collections skip the server's objects: fewer copy-on-write page copies
    request = read_frame(0)
    if request is None:
        return
    header, blobs = request
    cfg = dict(header["cfg"], bpf=blobs[0] if blobs and blobs[0] else None)
    cfg["prepared"] = Prepared(cfg["bpf"])
    os.environ.clear()  # the programs' environment, inherited by every fork
    os.environ.update(cfg["env"])
    prepare_streams()
    with open(os.devnull, "rb", buffering=0) as f:  # warm the codec lookups every program's stdio repeats
        io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8").read()
    del request, header, blobs
    # Its memory will hold every request: no process of its uid (a program without a PID namespace or a uid
    # drop) may read it, nor open its descriptors, through /proc. The template (and every program) inherit it.
    check_syscall(c.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")
    server = ForkServer(cfg)  # forks the template: nothing of any request is in memory yet
    write_all(1, pack_frame({"ready": True, "layers": server.self_test()}))
    while True:
        request = read_frame(0)
        if request is None:
            return
        header, blobs = request
        op = header["op"]
        try:
            if op == "runs":
                reply, out_blobs = server.do_runs(header, blobs)
            elif op == "call":
                reply, out_blobs = server.do_calls(header, blobs)
            elif op == "end_test":
                reply, out_blobs = server.do_end_test(header)
            elif op == "end":
                server.end_session()
                reply, out_blobs = {"ended": True}, []
            else:
                raise ValueError("unknown op %r" % op)
        except TemplateGone:  # no pristine process to clone programs from: the worker must be replaced
            os._exit(1)
        except Exception as e:  # an infrastructure failure, not the program's
            server.end_session()
            reply, out_blobs = {"fatal": "%s: %s" % (type(e).__name__, e)}, []
        write_all(1, pack_frame(reply, out_blobs))
