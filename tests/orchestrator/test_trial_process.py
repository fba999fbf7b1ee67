"""A trial's process tree is killed whole on every exit path, including descendants that left its group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from orchestrator.trial_process import TrialProcess, alive, kill_recorded

# A trial stand-in: a child in the group and a grandchild that starts its own session (as the sandbox's
# workers do), then waits. It writes their pids so the test can look for them.
TREE = """
import os, subprocess, sys, time
same_group = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
own_session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{same_group.pid} {own_session.pid}")
time.sleep(600)
"""


def start(tmp_path: Path) -> tuple[TrialProcess, list[int]]:
    pids_file = tmp_path / "pids"
    proc = TrialProcess([sys.executable, "-c", TREE, str(pids_file)], env=dict(os.environ),
                        log_path=tmp_path / "log", record_path=tmp_path / "processes.json", cwd=tmp_path)
    proc.__enter__()
    deadline = time.monotonic() + 30
    while not pids_file.is_file() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the stand-in trial did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.poll()  # records the tree, as the trainable does every poll
    return proc, [proc.pid, *map(int, pids_file.read_text().split())]


def running(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_stop_kills_the_group_and_descendants_that_left_it(tmp_path):
    proc, pids = start(tmp_path)
    assert os.getpgid(pids[2]) != pids[0]  # the grandchild really left the group
    records = json.loads((tmp_path / "processes.json").read_text())
    assert {int(p) for p in records} >= set(pids)
    proc.stop()
    assert running(pids) == []
    assert json.loads((tmp_path / "processes.json").read_text()) == {}


def test_a_killed_child_leaves_nothing_behind(tmp_path):
    proc, pids = start(tmp_path)
    os.kill(pids[0], signal.SIGKILL)  # the trial's own process dies, as in an OOM kill
    deadline = time.monotonic() + 10
    while proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert running(pids[1:]) == pids[1:]  # its descendants outlive it ...
    assert proc.stop() == -signal.SIGKILL
    assert running(pids) == []  # ... until the clean-up


def test_next_attempt_kills_what_a_dead_trainable_left(tmp_path):
    """The trainable itself is SIGKILLed (its node's Ray worker dies): the child dies with it
    (PR_SET_PDEATHSIG), its descendants do not; the next attempt kills them from the record."""
    trainable = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from orchestrator.trial_process import TrialProcess
tmp = Path({str(tmp_path)!r})
proc = TrialProcess([sys.executable, "-c", {TREE!r}, str(tmp / "pids")], env=dict(os.environ),
                    log_path=tmp / "log", record_path=tmp / "processes.json", cwd=tmp)
proc.__enter__()
while True:
    proc.poll()
    time.sleep(0.1)
"""])
    pids_file = tmp_path / "pids"
    deadline = time.monotonic() + 30
    while not pids_file.is_file() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    records = {int(p): t for p, t in json.loads((tmp_path / "processes.json").read_text()).items()}
    descendants = list(map(int, pids_file.read_text().split()))
    assert set(descendants) <= set(records)
    trainable.kill()
    trainable.wait()
    time.sleep(0.5)
    child = [p for p in records if p not in descendants and p != trainable.pid]
    assert running(child) == []  # died with its parent
    assert running(descendants) == descendants
    assert kill_recorded(tmp_path / "processes.json") == 2
    assert running(descendants) == [] and alive(records) == []


def test_the_guard_kills_everything_when_its_trainable_dies(tmp_path):
    """A trainable SIGKILLed by Ray runs no clean-up of its own: the guard (a subreaper told of its parent's
    death) kills the trial's descendants, including one in a session of its own and orphans."""
    pids_file = tmp_path / "pids"
    trainable = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-m", "orchestrator.trial_guard", "--", sys.executable, "-c", {TREE!r},
                  {str(pids_file)!r}], start_new_session=True)
time.sleep(600)
"""], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not pids_file.is_file() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    descendants = list(map(int, pids_file.read_text().split()))
    (guard,) = psutil.Process(trainable.pid).children()
    tree = [p.pid for p in guard.children(recursive=True)]  # the supervisor, the trial, its descendants
    trainable.kill()
    trainable.wait()
    deadline = time.monotonic() + 20
    while running([guard.pid, *tree, *descendants]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running([guard.pid, *tree, *descendants]) == []


def test_the_guard_cleans_up_when_ray_kills_it(tmp_path):
    """Ray SIGKILLs a dead worker's direct children, the guard among them: its supervisor cleans up."""
    pids_file = tmp_path / "pids"
    guard = subprocess.Popen([sys.executable, "-m", "orchestrator.trial_guard", "--", sys.executable, "-c", TREE,
                              str(pids_file)], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not pids_file.is_file() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tree = [p.pid for p in psutil.Process(guard.pid).children(recursive=True)]
    guard.kill()
    guard.wait()
    deadline = time.monotonic() + 20
    while running(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(tree) >= 4 and running(tree) == []


def test_the_guard_ends_like_its_command_and_leaves_no_orphan(tmp_path):
    pids_file = tmp_path / "pids"
    script = TREE.rsplit("time.sleep(600)", 1)[0] + "os.kill(os.getpid(), 9)\n"
    guard = subprocess.run([sys.executable, "-m", "orchestrator.trial_guard", "--", sys.executable, "-c", script,
                            str(pids_file)], cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert guard.returncode == -signal.SIGKILL  # the trainable sees the trial's own death
    assert running(list(map(int, pids_file.read_text().split()))) == []


def test_an_unreadable_record_is_said_and_the_leftovers_found_by_their_marker(tmp_path):
    """A record cut short (a disk that filled up) names no process: the next attempt says so in its log and
    kills the earlier attempt's processes by the OPSD_TRIAL marker they inherited, and no other process."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    leftover = subprocess.Popen(sleeper, env={**os.environ, "OPSD_TRIAL": "sweep/trial-a"}, start_new_session=True)
    other_trial = subprocess.Popen(sleeper, env={**os.environ, "OPSD_TRIAL": "sweep/trial-b"})
    unmarked = subprocess.Popen(sleeper)
    try:
        record = tmp_path / "processes.json"
        record.write_text('{"4242": 17')
        said = []
        assert kill_recorded(record, marker="sweep/trial-a", warn=said.append) == 1
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert other_trial.poll() is None and unmarked.poll() is None
        assert len(said) == 1 and str(record) in said[0] and "cannot be read" in said[0]
        assert "killed 1 process(es) of an earlier attempt found by OPSD_TRIAL=sweep/trial-a" in said[0]
        assert json.loads(record.read_text()) == {}  # the next attempt starts a fresh record
    finally:
        for p in (leftover, other_trial, unmarked):
            p.kill()
            p.wait()


# The trial's process starts one that starts another in a session of its own, which ignores SIGTERM (a vLLM
# engine core slow to stop, a stuck worker); then the middle one exits on SIGTERM and orphans it.
ORPHAN_ON_SIGTERM = """
import subprocess, sys, time
middle = subprocess.Popen([sys.executable, "-c", '''
import signal, subprocess, sys, time
stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(stubborn.pid))
time.sleep(600)
''', sys.argv[1]])
time.sleep(600)
"""


def test_the_supervisor_adopts_and_kills_orphans_after_the_outer_guard_dies(tmp_path):
    """Ray SIGKILLs the outer guard; its supervisor stops the trial with SIGTERM. A process orphaned on the way
    (its parent gone, itself ignoring SIGTERM) becomes the supervisor's child, since the supervisor is a
    subreaper of its own (the attribute is not inherited through fork), and is killed, not left to init."""
    pid_file = tmp_path / "stubborn"
    guard = subprocess.Popen([sys.executable, "-m", "orchestrator.trial_guard", "--", sys.executable, "-c",
                              ORPHAN_ON_SIGTERM, str(pid_file)], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the stand-in trial did not start"
        time.sleep(0.05)
    stubborn = int(pid_file.read_text())
    tree = [p.pid for p in psutil.Process(guard.pid).children(recursive=True)]
    assert stubborn in tree
    try:
        guard.kill()
        guard.wait()
        deadline = time.monotonic() + 30  # the supervisor's grace (10 s) for the trial to stop by itself
        while running(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(tree) == []
    finally:
        for pid in running(tree):
            os.kill(pid, signal.SIGKILL)
