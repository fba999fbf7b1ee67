"""The parts of a call session's process that stand alone (``sandbox/calls.py``) and the fork server's check
that it runs nothing between calls (``sandbox/runner.py``)."""

from __future__ import annotations

import os

from sandbox import calls, runner


def test_the_scratch_dir_is_emptied_whatever_a_call_left(tmp_path):
    scratch, outside, around = tmp_path / "around" / "p1", tmp_path / "outside", tmp_path / "around"
    scratch.mkdir(parents=True)
    outside.mkdir()
    (outside / "keep.txt").write_text("not the program's")
    fd = os.open(scratch, os.O_RDONLY)
    for i in range(40):  # deeper than PATH_MAX in all: 40 names of 200 bytes
        name = "d%03d" % i + "x" * 196
        os.mkdir(name, dir_fd=fd)
        fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    (scratch / "locked" / "inner").mkdir(parents=True)
    (scratch / "locked" / "inner" / "f").write_text("x")
    os.chmod(scratch / "locked" / "inner", 0)
    os.chmod(scratch / "locked", 0)
    os.mkfifo(scratch / "fifo")
    os.symlink(outside, scratch / "link-to-outside")
    (scratch / ".hidden").write_text("x")
    (around / "beside").write_text("x")  # where a program can write without mounts (bubblewrap's /tmp)
    os.setxattr(scratch, "user.kept", b"1")
    os.chmod(scratch, 0o500)
    os.utime(scratch, (5, 6))
    calls._reset_scratch(str(scratch), str(around), calls._Buffer())
    assert os.listdir(scratch) == [] and os.listdir(around) == ["p1"]
    assert os.listxattr(scratch) == [] and os.stat(scratch).st_mode & 0o7777 == 0o700
    assert os.stat(scratch).st_mtime_ns == 0
    assert (outside / "keep.txt").read_text() == "not the program's"  # a link is removed, never followed


class _Session:
    """A stand-in for a session's process whose CPU time moved by ``idle`` seconds since its last call."""

    def __init__(self, idle: float):
        self.cpu_mark, self.idle, self.closed = 10.0, idle, False

    def cpu(self) -> float:
        return self.cpu_mark + self.idle

    def close(self, server) -> None:
        self.closed = True


def test_cpu_time_spent_between_calls_ends_the_session():
    server = object.__new__(runner.ForkServer)
    server.session, server.session_failure, server.test = _Session(idle=0.5), None, None
    result, out, err = server.do_call({"output_bytes": 100}, None, "f", "[]", 1.0, 10.0)
    assert (result["status"], result["error"], result["ended"]) == (
        "runtime_error", "the program used CPU time between calls", True)
    assert server.session is None and (out, err) == (b"", b"")
    # Every later call answers the same at once.
    assert server.do_call({"output_bytes": 100}, None, "f", "[]", 1.0, 10.0)[0]["status"] == "runtime_error"
