"""The cgroup layer on cgroup v2, on a fake hierarchy: a temporary directory laid out as the kernel lays out a
delegated cgroup (``cgroup.controllers``, ``cgroup.subtree_control``, ``cgroup.procs``, ``cgroup.type``),
named by a fake /proc/self/cgroup ("0::/app") and /proc/self/mountinfo (a cgroup2 mount on it). Writing a
number into a fake ``cgroup.procs`` moves nothing and no limit binds: what is checked is what the sandbox
writes and reads there, and what it does with it (an OOM kill counted in ``memory.events`` becomes the run's
``memory_limit``). The real hierarchy of the machine the suite runs on is used by tests/sandbox/test_hostile.py.
And the start-up line when no cgroup can be had.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from sandbox import isolation
from sandbox.executor import Executor, Limits

LIMITS = Limits(wall_s=10, cpu_s=10, memory_mb=256, n_procs=16, file_bytes=1 << 20)


def fake_hierarchy(tmp_path: Path, *, controllers: str = "cpu memory pids", others: str = "") -> Path:
    """A cgroup2 mount at tmp/cg holding this process in /app (with ``others``, more process ids)."""
    proc, mount = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/app\n")
    (proc / "mountinfo").write_text(
        "22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
        f"36 25 0:31 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n")
    app = mount / "app"
    app.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu io memory pids\n")
    (app / "cgroup.controllers").write_text(controllers + "\n")
    (app / "cgroup.subtree_control").write_text("\n")
    (app / "cgroup.type").write_text("domain\n")
    (app / "cgroup.procs").write_text(f"{os.getpid()}\n{others}")
    return app


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    app = fake_hierarchy(tmp_path)
    monkeypatch.setattr(isolation, "PROC_SELF", str(tmp_path / "proc"))
    monkeypatch.setattr(isolation, "CGROUP_ROOT", str(tmp_path / "no-v1"))  # no cgroup v1 hierarchy here
    monkeypatch.setattr(isolation, "_v2_base_cache", {})
    return app


def test_a_delegated_v2_cgroup_gets_a_leaf_for_this_process_and_the_controllers_below(fake_v2):
    assert isolation.cgroup_version() == (2, None)
    leaf = fake_v2 / f"opsd-trusted-{os.getpid()}"
    assert (leaf / "cgroup.procs").read_text() == f"{os.getpid()}\n"  # this process moved out of /app first
    assert (fake_v2 / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert isolation.cgroup_version() == (2, None)  # once per process: nothing is written again
    assert (leaf / "cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_a_worker_cgroup_on_v2_holds_its_tree_and_its_limits(fake_v2):
    cgroup = isolation.WorkerCgroup("t")
    d = fake_v2 / f"opsd-sbx-{os.getpid()}-t"
    try:
        assert cgroup.version == 2 and set(cgroup.dirs) == {"memory", "pids", "cpu"}
        assert set(cgroup.dirs.values()) == {str(d)}
        assert (d / "cpu.max").read_text() == "100000 100000"  # one core
        (d / "memory.swap.max").write_text("max\n")  # (the kernel makes it where swap is accounted)
        cgroup.set_limits(300 << 20, 24)
        assert (d / "memory.max").read_text() == str(300 << 20)
        assert (d / "memory.swap.max").read_text() == "0" and (d / "pids.max").read_text() == "24"
        cgroup.add_tree(os.getpid())
        assert str(os.getpid()) in (d / "cgroup.procs").read_text().split()
        (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
        assert cgroup.oom_kills() == 2
        (d / "memory.events").write_text("low 0\n")  # no count to read: an error, never "no kill"
        with pytest.raises(OSError, match="no oom_kill count"):
            cgroup.oom_kills()
    finally:
        cgroup.remove()


def test_a_process_the_v2_cgroup_does_not_hold_fails_the_worker(fake_v2, monkeypatch):
    cgroup = isolation.WorkerCgroup("lost")
    monkeypatch.setattr(isolation, "_read_words", lambda path: set())  # cgroup.procs lists nobody
    with pytest.raises(OSError, match="not in the cgroup"):
        cgroup.add_tree(os.getpid())


@pytest.mark.parametrize("case, why", [
    ("controllers", "cgroup v2: the memory and pids controllers are not delegated to"),
    ("shared", "holds other processes (1)"),
])
def test_a_v2_cgroup_that_cannot_be_used_says_why(tmp_path, monkeypatch, case, why):
    app = fake_hierarchy(tmp_path, controllers="cpu" if case == "controllers" else "cpu memory pids",
                         others="1\n" if case == "shared" else "")
    monkeypatch.setattr(isolation, "PROC_SELF", str(tmp_path / "proc"))
    monkeypatch.setattr(isolation, "CGROUP_ROOT", str(tmp_path / "no-v1"))
    monkeypatch.setattr(isolation, "_v2_base_cache", {})
    version, reason = isolation.cgroup_version()
    assert version is None and reason.startswith("no cgroup v1 memory hierarchy; ") and why in reason, reason
    assert (app / "cgroup.subtree_control").read_text() == "\n" and not list(app.glob("opsd-*"))


def test_an_executor_on_a_v2_hierarchy_counts_oom_kills_from_memory_events(fake_v2, caplog):
    with caplog.at_level(logging.INFO, logger="sandbox.executor"):
        ex = Executor(1, limits=LIMITS)
    try:
        report = ex.isolation_report()
        assert report["cgroup"] and "(cgroup v2)" in ex.limits_line, ex.limits_line
        assert any(r.getMessage() == ex.limits_line and r.levelno == logging.INFO for r in caplog.records)
        (worker_dir,) = fake_v2.glob("opsd-sbx-*")
        events = worker_dir / "memory.events"
        events.write_text("oom 0\noom_kill 0\n")
        with ex.session("import time\ntime.sleep(1.0)\nprint('done')\n") as s:
            # The kernel's OOM killer strikes in the worker's cgroup while the program runs.
            threading.Timer(0.3, lambda: events.write_text("oom 1\noom_kill 1\n")).start()
            killed = s.run_stdin(b"", timeout_s=5)
            fine = s.run_stdin(b"", timeout_s=5)
        assert (killed.status, killed.error) == ("memory_limit", "the program's processes exceeded the memory limit")
        assert (fine.status, fine.stdout) == ("ok", b"done\n")
        # The worker's limits: the program's memory plus the fork server's allowance and its scratch tmpfs.
        assert int((worker_dir / "memory.max").read_text()) == (256 << 20) + (64 << 20) + (16 << 20)
        assert (worker_dir / "pids.max").read_text() == str(16 + 8)
        # A count that cannot be read fails closed: the run counts as over the memory limit.
        events.write_text("garbage\n")
        with ex.session("print('x')\n") as s:
            assert s.run_stdin(b"", timeout_s=5).status == "memory_limit"
    finally:
        ex.close()


def test_without_a_cgroup_the_start_up_line_says_which_limits_hold(caplog):
    with caplog.at_level(logging.WARNING, logger="sandbox.executor"):
        with Executor(1, limits=LIMITS, disable={"cgroup"}) as ex:
            line = ex.limits_line
    assert any(r.getMessage() == line and r.levelno == logging.WARNING for r in caplog.records)
    assert line.startswith("sandbox limits without a cgroup (disabled) that hold: CPU time per run or call")
    held, lost = line.split("; do NOT hold: ")
    assert "address space per process (memory_mb)" in held and "no sockets, socket pairs or memfds" in held
    assert "memory of the program's processes together" in lost and "pipe buffers" in lost


def test_the_limits_line_follows_the_layers():
    layers = {"seccomp": True, "uid_drop": True}
    with_cgroup = isolation.limits_line(layers, 2, None, pinned=False)
    assert "memory of all the program's processes together, their number and one core per worker (cgroup v2)" in with_cgroup
    assert "do NOT hold" not in with_cgroup
    pinned = isolation.limits_line(layers, None, "no cgroup v2 hierarchy", pinned=True)
    assert "one core per worker (CPU affinity the program cannot change)" in pinned.split("; do NOT hold: ")[0]
    bare = isolation.limits_line({}, None, "why", pinned=True)
    held, lost = bare.split("; do NOT hold: ")
    assert "memory in socket buffers and memfds (seccomp is off)" in lost and "one core per worker" in lost
    assert "the number of processes" in lost and "sockets" not in held
