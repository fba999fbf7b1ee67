"""A trial's processes: started together, watched, and all killed on every exit path.

A trial runs as `opsd trial` under a guard process (orchestrator/trial_guard.py: a subreaper that kills every
descendant when the trial ends or its trainable dies) in a child process of the Ray Tune trainable, in a
session of its own, with its DeepSpeed ranks, vLLM engine and sandbox workers below it. Orphaned vLLM processes holding GPU memory after a
failed trial are what sweep users hit first (ray#54364, vllm#20860), so nothing is left to chance:
- the child is a process-group leader (its own session) that dies with its parent (PR_SET_PDEATHSIG);
- the trainable records the child's whole process tree while it runs (pid and start time, in the trial
  folder), because some descendants start sessions of their own (the sandbox's workers do) and leave the group;
- on exit (normal, error, or a retry's start finding an earlier attempt's leftovers) the group gets SIGTERM,
  then SIGKILL, and every recorded process still alive with the same start time is killed;
- a record that cannot be read (a disk that filled up) is said in the attempt's log, and the leftovers are
  found instead by the marker every process of the trial carries in its environment (OPSD_TRIAL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from trainer.records import atomic_write_bytes

# A process record: (pid, create_time); the start time tells a recorded process from a new one with its pid.
ProcessRecord = tuple[int, float]

# The child exits by itself on SIGTERM (vLLM and DeepSpeed shut down); a stuck one is killed after this.
TERMINATE_GRACE_S = 15.0


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL when the trainable's process dies, even by SIGKILL."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TrialProcess:
    """`with TrialProcess(cmd, env=..., log_path=..., record_path=...) as proc:` runs `cmd` and cleans up.

    `record_path` (a JSON file in the trial folder) holds the process tree seen so far, so that the next
    attempt can kill what an attempt that died with its trainable left behind (`kill_recorded`); `marker` is
    the value of the trial's OPSD_TRIAL variable, by which leftovers are found when the record is unreadable,
    and `warn` writes a line into the attempt's log.
    """

    def __init__(self, cmd: list[str], *, env: dict[str, str], log_path: Path, record_path: Path, cwd: Path,
                 marker: str | None = None, warn: Callable[[str], None] | None = None):
        self.cmd, self.env, self.log_path, self.record_path, self.cwd = cmd, env, log_path, record_path, cwd
        self.marker, self.warn = marker, warn or (lambda message: None)
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, float] = {}

    def __enter__(self) -> "TrialProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kill_recorded(self.record_path, marker=self.marker, warn=self.warn)
        log = open(self.log_path, "ab", buffering=0)
        try:
            # preexec_fn is a single prctl call (async-signal-safe in practice); start_new_session makes the
            # child a process-group leader whose group we can signal whole.
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.record()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code, or None while running; records the current process tree."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            self.record()
        return code

    def record(self) -> None:
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        changed = False
        for p in tree:
            try:
                created = p.create_time()
            except psutil.NoSuchProcess:
                continue
            if self.seen.get(p.pid) != created:
                self.seen[p.pid] = created
                changed = True
        if changed:
            _write_records(self.record_path, self.seen)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        """End the trial's processes (a no-op for those already gone); returns the child's exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.record()
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        _kill_all(self.seen)
        _write_records(self.record_path, {})
        return code


def kill_recorded(record_path: Path, *, marker: str | None = None,
                  warn: Callable[[str], None] | None = None) -> int:
    """Kill every process an earlier attempt recorded that is still alive; returns how many were.

    When the record exists but cannot be read, `warn` says so and the processes of this machine whose
    environment carries `OPSD_TRIAL=marker` (every process of the trial inherits it) are killed instead."""
    if not record_path.is_file():
        return 0
    try:
        records = {int(pid): float(created) for pid, created in json.loads(record_path.read_text()).items()}
    except (ValueError, OSError, AttributeError, TypeError) as err:
        found = marked(marker) if marker else {}
        killed = _kill_all(found)
        if warn is not None:
            warn(f"{record_path} cannot be read ({type(err).__name__}: {err}); "
                 + (f"killed {killed} process(es) of an earlier attempt found by OPSD_TRIAL={marker}" if marker
                    else "processes an earlier attempt left behind cannot be found"))
        _write_records(record_path, {})
        return killed
    killed = _kill_all(records)
    _write_records(record_path, {})
    return killed


def marked(marker: str) -> dict[int, float]:
    """The processes of this machine (readable by this user) whose environment has OPSD_TRIAL=marker, as
    {pid: start time}; this process is never among them."""
    found = {}
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get("OPSD_TRIAL") == marker:
                found[p.pid] = p.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def alive(records: dict[int, float]) -> list[int]:
    """The recorded processes that still run (same pid and start time)."""
    out = []
    for pid, created in records.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_all(records: dict[int, float]) -> int:
    victims = alive(records)
    for pid in victims:
        # The group first: a recorded leader takes its whole group down, including members started after the
        # last record.
        _signal_group(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while alive(records) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(victims)


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _write_records(path: Path, records: dict[int, float]) -> None:
    atomic_write_bytes(path, json.dumps({str(pid): created for pid, created in records.items()}).encode())


def trial_command(trial_file: Path, out_dir: Path) -> list[str]:
    """`opsd trial` for one grid point under the trial guard (orchestrator/trial_guard.py), with the
    interpreter that runs the sweep."""
    return [sys.executable, "-m", "orchestrator.trial_guard", "--",
            sys.executable, "-m", "orchestrator.cli", "trial", str(trial_file), "--out", str(out_dir)]
