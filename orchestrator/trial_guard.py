"""`python -m orchestrator.trial_guard -- CMD...`: runs a trial's command and takes every process it starts
down with it, whatever ends first: the command, the guard's parent (the Ray Tune trainable, even killed with
SIGKILL), the guard itself killed by Ray, or a SIGTERM.

The guard is two processes, both child subreapers (PR_SET_CHILD_SUBREAPER: a descendant orphaned by its
parent's death, such as a vLLM engine core whose trial process was OOM-killed or a sandbox worker in its own
session, becomes the guard's child instead of init's, so the guard can always find and kill it). The outer
one is the trainable's child; the supervisor below it runs the command and is told (PR_SET_PDEATHSIG) when
the outer one dies, even by the SIGKILL Ray sends to a dead worker's children. On any ending every
descendant is killed, and the guard exits as the command did (a command killed by a signal makes the guard
die of the same signal, so the trainable sees what happened).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def kill_descendants(grace_s: float) -> None:
    """SIGTERM to every descendant, then SIGKILL to those still there after `grace_s`; reaps them all."""
    me = psutil.Process()
    victims = me.children(recursive=True)
    for p in victims:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    # Orphans of the processes just ended become our children meanwhile: kill whatever is left, repeatedly.
    for _ in range(50):
        alive = me.children(recursive=True)
        if not alive:
            break
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=1.0)
    _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m orchestrator.trial_guard -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    # Two processes, because Ray SIGKILLs the direct children of a worker that exits
    # (RAY_kill_child_processes_on_worker_exit, on by default): the outer one (here) is that direct child; the
    # supervisor below is told of the outer one's death (PR_SET_PDEATHSIG) and cleans up. Both are subreapers.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    outer = os.getpid()
    supervisor = os.fork()
    if supervisor == 0:
        # fork() does not pass the subreaper attribute on: without its own, the supervisor's orphans would go
        # to the outer process, or to init once that is gone, out of kill_descendants' sight.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != outer:  # the outer process died before PR_SET_PDEATHSIG took effect
            os._exit(1)
        _exit_as(supervise(argv[1:]))
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the trainable's death (when Ray does not kill us first)

    def forward(signum, _frame):
        try:
            os.kill(supervisor, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(supervisor, 0)
            break
        except InterruptedError:
            continue
    kill_descendants(1.0)  # whatever the supervisor's death left (orphans come to this subreaper)
    return os.waitstatus_to_exitcode(status)


def supervise(cmd: list[str]) -> int:
    """Run `cmd`; on its end, or on SIGTERM/SIGINT/SIGHUP (the outer guard died or forwarded a stop), kill
    every descendant. Returns the command's exit code (negative: the signal that killed it)."""
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    child = subprocess.Popen(cmd)
    code = None
    while code is None and stopping["signal"] is None:
        try:
            code = child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        _reap_orphans_except(child.pid)
    if code is None:  # stopped from outside: the trial goes first, gently
        kill_descendants(GRACE_S)
        return 128 + stopping["signal"]
    kill_descendants(1.0)
    return code


def _exit_as(code: int) -> None:
    """Exit with `code`, or die of the signal -`code`, so a parent sees what happened to the command."""
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    os._exit(code & 0xFF)


def _reap_orphans_except(pid: int) -> None:
    """Collect exit statuses of orphans adopted by the guard (they would stay zombies otherwise)."""
    for p in psutil.Process().children():
        if p.pid == pid:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


if __name__ == "__main__":
    _exit_as(main(sys.argv[1:]))
