"""`python -m orchestrator.trial_guard -- CMD...`: runs a trial's command and takes every process it starts
down with it, whatever ends first: the command, the guard's parent (the Ray Tune trainable, even killed with
SIGKILL by Ray), or a SIGTERM.

The guard is a child subreaper (PR_SET_CHILD_SUBREAPER): a descendant orphaned by its parent's death (a vLLM
engine core whose trial process was OOM-killed, a sandbox worker in its own session) becomes the guard's
child instead of init's, so the guard can always find and kill it. It asks for SIGTERM when its parent dies
(PR_SET_PDEATHSIG), and on any ending kills all its descendants, then exits as the command did (a command
killed by a signal makes the guard die of the same signal, so the trainable sees what happened).
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
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if os.getppid() != parent:  # the parent died before PR_SET_PDEATHSIG took effect
        return 1
    child = subprocess.Popen(argv[1:])
    code = None
    while code is None and stopping["signal"] is None:
        try:
            code = child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        _reap_orphans_except(child.pid)
    if code is None:  # our parent died or asked us to stop: the trial goes first, gently
        kill_descendants(GRACE_S)
        return 128 + stopping["signal"]
    kill_descendants(1.0)
    if code < 0:  # die as the command died, so our parent sees the same signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    return code


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
    sys.exit(main(sys.argv[1:]))
