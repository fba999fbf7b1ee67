"""The hostile battery: each program is contained with the right status AND leaves no trace on the host.

Layers are also checked one at a time (``disable=``): the network is closed by the network namespace
alone and by seccomp alone, host files are out of reach through bubblewrap alone and through the uid drop
alone, orphans die with the PID namespace alone. Controls show the checks can fail (an orphan survives
when the PID namespace is off; io_uring works when seccomp is off).
"""

from __future__ import annotations

import glob
import os
import socket
import threading
import time
import uuid

import psutil
import pytest

from sandbox.executor import Executor, Limits
from tests.sandbox import executor_hostile_programs as H

FAST = Limits(wall_s=10, cpu_s=10, memory_mb=512)
# Without bubblewrap's user namespace RLIMIT_NPROC counts every process of uid 65534 on the host (other
# sandboxes included): tests of other layers get room to spare.
ROOMY = Limits(wall_s=10, cpu_s=10, memory_mb=512, n_procs=4096)


@pytest.fixture(scope="module")
def ex():
    with Executor(2, isolation="full", limits=FAST) as executor:
        yield executor


def run(ex, code, stdin=b"", timeout_s=5.0, limits=None):
    with ex.session(code, limits=limits) as s:
        return s.run_stdin(stdin, timeout_s=timeout_s)


def descendants(ex) -> int:
    """Processes under the workers, counted in a settled state: every worker has just served a program and
    the count has stopped moving."""
    for _ in ex._pool._all:  # the pool lends its idle workers in turn
        run(ex, "pass")
    counts = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(counts) < 3 or len(set(counts[-3:])) > 1):
        counts.append(sum(len(psutil.Process(w.proc.pid).children(recursive=True)) for w in ex._pool._all if w.alive))
        time.sleep(0.05)
    return counts[-1]


processes_named = H.processes_named


# ------------------------------------------------------------------------------------------ processes
def test_fork_bomb_is_contained_and_leaves_no_process(ex):
    before = descendants(ex)
    counted = run(ex, H.FORK_COUNT)
    assert counted.status == "ok" and 1 <= int(counted.stdout) <= FAST.n_procs
    bomb = run(ex, H.FORK_BOMB, timeout_s=1.0)
    assert bomb.status == "time_limit" and bomb.wall_s < 5
    assert descendants(ex) == before == 3 * len(ex._pool._all)  # bubblewrap, fork server, its template


def test_fork_limit_holds_without_bubblewrap():
    with Executor(1, limits=FAST, disable={"bwrap"}) as ex1:
        counted = run(ex1, H.FORK_COUNT)
    assert counted.status == "ok" and int(counted.stdout) <= FAST.n_procs


def test_orphans_die_with_the_program(ex):
    marker = "orph" + uuid.uuid4().hex[:8]
    out = run(ex, H.ORPHAN, marker.encode())
    assert out.status == "ok"
    assert processes_named(marker) == []
    # While a call runs, its orphan exists (the check can see it) ...
    marker = "orph" + uuid.uuid4().hex[:8]
    seen: list[int] = []

    def watch() -> None:
        deadline = time.time() + 5
        while not seen and time.time() < deadline:
            seen.extend(processes_named(marker))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ex.session(H.ORPHAN + "def start_and_wait(marker):\n    orphan(marker)\n    time.sleep(1.5)\n    return 1\n") as s:
        assert s.call("start_and_wait", [marker], timeout_s=5).value == 1
        # ... and the end of the call takes it down (each call is a process of its own).
        after = processes_named(marker)
    watcher.join()
    assert len(seen) == 1 and after == [], (seen, after)


def test_pid_namespace_alone_kills_orphans_and_the_check_sees_survivors():
    marker = "orph" + uuid.uuid4().hex[:8]
    with Executor(1, limits=ROOMY, disable={"bwrap"}) as ex1:
        assert ex1.isolation_report()["pid_namespace"]
        assert run(ex1, H.ORPHAN, marker.encode()).status == "ok"
        assert processes_named(marker) == []
    with Executor(1, limits=ROOMY, disable={"bwrap", "pid_namespace"}) as ex2:
        assert run(ex2, H.ORPHAN, marker.encode()).status == "ok"
        deadline = time.time() + 5  # the grandchild renames itself a moment after the program returns
        while not processes_named(marker) and time.time() < deadline:
            time.sleep(0.02)
        survivors = processes_named(marker)
        for pid in survivors:  # the orphan this test started
            os.kill(pid, 9)
    assert len(survivors) == 1


def test_program_ignoring_sigterm_and_sigalrm_is_killed(ex):
    out = run(ex, H.IGNORES_SIGNALS, timeout_s=1.0)
    assert out.status == "time_limit" and out.wall_s < 5


def test_infinite_loop(ex):
    out = run(ex, "while True:\n    pass\n", timeout_s=0.5)
    assert out.status == "time_limit"


def test_killing_its_parent_changes_nothing(ex):
    pids = [w.proc.pid for w in ex._pool._all]
    out = run(ex, H.KILL_PARENT)
    assert out.status == "ok" and out.stdout.endswith(b"still here\n")
    assert [w.proc.pid for w in ex._pool._all] == pids and all(w.alive for w in ex._pool._all)
    assert run(ex, "print(6 * 7)").stdout == b"42\n"


def test_a_killed_worker_is_replaced_transparently():
    # Without the PID namespace the program CAN reach the fork server: the executor must recover.
    with Executor(1, limits=ROOMY, disable={"pid_namespace"}) as ex1:
        first = ex1._pool._all[0].proc.pid
        out = run(ex1, "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)")
        assert out.status == "runtime_error"
        again = run(ex1, "print(input()[::-1])", b"olleh\n")
        assert (again.status, again.stdout) == ("ok", b"hello\n")
        assert ex1._pool._all[0].proc.pid != first


# ---------------------------------------------------------------------------------------- resources
def test_memory_bombs(ex):
    for code in (H.MEMORY_BOMB, H.ONE_BIG_ALLOCATION):
        out = run(ex, code)
        assert out.status == "memory_limit", (code, out)
    with ex.session("def grow():\n    return len(bytearray(8 << 30))\n") as s:
        first, second = s.call("grow", [], timeout_s=5), s.call("grow", [], timeout_s=5)
    assert first.status == second.status == "memory_limit"


def test_forked_memory_bomb_is_capped_by_the_cgroup(ex):
    if not ex.isolation_report()["cgroup"]:
        pytest.skip("no writable cgroup v1 memory hierarchy here")
    cgroups = [w.cgroup.dirs["memory"] for w in ex._pool._all]
    out = run(ex, H.FORKED_MEMORY_BOMB, timeout_s=8)
    assert out.status == "memory_limit"
    # Host side: no worker's cgroup ever held more than the program's limit plus the worker's allowance
    # (6 x 400 MiB were asked for).
    allowance = (FAST.memory_mb << 20) + (64 << 20) + (16 << 20)
    peaks = [int(open(os.path.join(d, "memory.max_usage_in_bytes")).read()) for d in cgroups]
    assert max(peaks) <= allowance


def test_huge_output_is_capped(ex):
    cap = 100_000
    for code in (H.HUGE_OUTPUT, H.HUGE_STDERR):
        out = run(ex, code, limits=Limits(output_bytes=cap))
        assert out.status == "output_limit" and len(out.stdout) + len(out.stderr) <= cap
        assert out.stdout + out.stderr and set(out.stdout + out.stderr) <= set(b"xe")
    with ex.session("def f():\n    while True:\n        print('y' * 1000)\n", limits=Limits(output_bytes=cap)) as s:
        call = s.call("f", [], timeout_s=5)
    assert call.status == "output_limit" and len(call.stdout) <= cap


def test_deep_recursion_is_a_runtime_error(ex):
    for code in (H.DEEP_RECURSION, H.DEEP_RECURSION_RAISED_LIMIT):
        out = run(ex, code)
        assert out.status == "runtime_error" and "RecursionError" in out.error, out
        assert out.error.count('File "<solution>"') == 3


def test_file_size_limit(ex):
    code = "try:\n    with open('big', 'wb') as f:\n        f.write(b'x' * 50000)\nexcept OSError as e:\n    print('blocked', e.errno)\n"
    out = run(ex, code, limits=Limits(file_bytes=1000))
    assert out.status == "ok" and out.stdout == b"blocked 27\n"  # EFBIG


# -------------------------------------------------------------------------------------- network, host
@pytest.mark.parametrize("disable", [(), ("seccomp",), ("bwrap",)], ids=["all", "netns-alone", "seccomp-alone"])
def test_no_network(ex, disable):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    try:
        if disable:
            with Executor(1, limits=ROOMY, disable=set(disable)) as ex1:
                out = run(ex1, H.CONNECT, str(port).encode())
        else:
            out = run(ex, H.CONNECT, str(port).encode())
        assert out.status == "ok" and b"CONNECTED" not in out.stdout and out.stdout.count(b"blocked") == 2
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize("disable", [(), ("uid_drop",), ("bwrap",)], ids=["all", "bwrap-alone", "uid-drop-alone"])
def test_host_files_out_of_reach(ex, tmp_path, disable):
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-" + uuid.uuid4().hex)
    secret.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    stdin = ("%s %s" % (target, secret)).encode()
    if disable:
        with Executor(1, limits=ROOMY, disable=set(disable)) as ex1:
            out = run(ex1, H.WRITE_AND_READ_HOST, stdin)
    else:
        out = run(ex, H.WRITE_AND_READ_HOST, stdin)
    assert out.status == "ok" and b"write blocked" in out.stdout and b"read blocked" in out.stdout
    assert list(target.iterdir()) == []
    assert secret.read_text().encode() not in out.stdout + out.stderr


@pytest.mark.parametrize("disable", [(), ("pid_namespace",)], ids=["all", "without-pid-namespace"])
def test_only_read_only_system_files_and_nothing_left_for_the_next_program(disable):
    leave = (
        "import os\n"
        "print(sorted(os.listdir('/')))\n"
        "for path in ('/usr/lib/pwned', '/pwned', '/dev/pwned', '/dev/shm/pwned', '/proc/pwned'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('blocked', path, e.errno)\n"
        "open('/tmp/left-over', 'w').write('mine')\n"
        "open('scratch.txt', 'w').write('mine')\n"
        "print(open('scratch.txt').read())\n"
    )
    look = "import os\nprint((sorted(os.listdir('/')), [p for p in os.listdir('/tmp') if '/tmp/' + p != os.getcwd()], os.listdir('.')))"
    with Executor(1, limits=ROOMY, disable=set(disable)) as ex1:  # one worker: both programs share it
        first = run(ex1, leave)
        second = run(ex1, look)
    lines = first.stdout.decode().splitlines()
    assert first.status == "ok" and not any(line.startswith("WROTE") for line in lines), lines
    assert set(eval(lines[0])) <= {"usr", "lib", "lib64", "lib32", "proc", "dev", "tmp"}  # our own print
    assert lines[-1] == "mine"
    root, tmp, cwd = eval(second.stdout.decode())  # our own print
    assert set(root) <= {"usr", "lib", "lib64", "lib32", "proc", "dev", "tmp"} and tmp == [] and cwd == []


def test_sysv_shared_memory_cannot_outlive_the_program():
    with Executor(1, limits=FAST) as ex1:  # one worker: both programs share it
        created = run(ex1, H.SYSV_SHM, b"create")
        found = run(ex1, H.SYSV_SHM, b"find")
    assert created.stdout.split() == found.stdout.split() == [b"-1", b"1"]  # EPERM: seccomp denies shmget
    # Without seccomp the program gets its own IPC namespace: the segment goes with the program.
    with Executor(1, limits=FAST, disable={"seccomp"}) as ex1:
        created = run(ex1, H.SYSV_SHM, b"create")
        found = run(ex1, H.SYSV_SHM, b"find")
    assert created.status == "ok" and int(created.stdout.split()[0]) >= 0
    assert found.stdout.split() == [b"-1", b"2"]


@pytest.mark.parametrize("disable", [(), ("bwrap",)], ids=["all", "without-bwrap"])
def test_environment_secrets_do_not_reach_the_program(monkeypatch, disable):
    secrets = {"WANDB_API_KEY": "wandb-" + uuid.uuid4().hex, "HF_TOKEN": "hf_" + uuid.uuid4().hex,
               "AWS_SECRET_ACCESS_KEY": "aws-" + uuid.uuid4().hex}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    with Executor(1, limits=ROOMY, disable=set(disable)) as ex1:
        out = run(ex1, H.ENVIRONMENT)
        with ex1.session("import os\ndef env():\n    return dict(os.environ)\n") as s:
            env = s.call("env", [], timeout_s=5).value
    assert out.status == "ok"
    for k, v in secrets.items():
        assert v.encode() not in out.stdout + out.stderr and k.encode() not in out.stdout
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME"}


# ------------------------------------------------------------------------------------- kernel attack
def test_io_uring_is_denied(ex):
    out = run(ex, H.IO_URING)
    assert out.status == "ok" and out.stdout.split()[0] == b"-1" and int(out.stdout.split()[1]) in (1, 13)


def test_io_uring_denied_by_seccomp_alone_and_open_without_it():
    with Executor(1, limits=ROOMY, disable={"bwrap"}) as ex1:
        alone = run(ex1, H.IO_URING)
    assert alone.stdout.split() == [b"-1", b"1"]  # EPERM from the filter
    with Executor(1, limits=ROOMY, disable={"seccomp", "bwrap"}) as ex2:
        control = run(ex2, H.IO_URING)
    # Without the filter the call reaches the kernel (a ring fd, or ENOMEM under RLIMIT_MEMLOCK=0): the
    # EPERM above is the filter's.
    r, err = map(int, control.stdout.split())
    assert control.status == "ok" and (r >= 0 or err != 1)


@pytest.mark.parametrize("disable", [(), ("bwrap", "seccomp")], ids=["all", "uid-drop-alone"])
def test_no_privilege(ex, disable):
    if disable:
        with Executor(1, limits=ROOMY, disable=set(disable)) as ex1:
            out = run(ex1, H.PRIVILEGE)
    else:
        out = run(ex, H.PRIVILEGE)
    uid, euid, results = out.stdout.decode().split(maxsplit=2)
    assert out.status == "ok" and uid == euid == "65534"
    for item in results.strip().split(";"):  # "setuid 1" (errno) or "mount -1 1" (return value, errno)
        if disable and item.startswith("unshare"):
            continue  # any unprivileged user may create a user namespace; seccomp is what denies it
        numbers = [int(x) for x in item.split()[1:]]
        assert numbers[-1] in (1, 22) and (len(numbers) == 1 or numbers[0] == -1), item


# ------------------------------------------------------------------------------------------ grading
def test_always_equal_and_subclasses_are_not_plain_data(ex):
    with ex.session(H.ALWAYS_EQUAL) as s:
        outcomes = {name: s.call(name, [3], timeout_s=5) for name in ("eq", "sneaky_int", "nested")}
    assert {k: (o.status, o.value) for k, o in outcomes.items()} == {k: ("runtime_error", None) for k in outcomes}
    assert outcomes["eq"].error == "returned a AlwaysEqual object, not plain data"
    assert outcomes["sneaky_int"].error == "returned a SneakyInt object, not plain data"
    assert outcomes["nested"].error == "returned a SneakyList object, not plain data"


def test_stack_walk_cannot_find_expected_values(ex):
    expected = 987654321  # the grader's expected value: it never enters the sandbox
    with ex.session(H.STACK_WALK) as s:
        got = s.call("f", [1], timeout_s=5)
    assert got.status == "ok" and type(got.value) is list
    assert expected not in got.value and repr(expected) not in got.value
    assert got.value != expected


def test_forged_runner_frames_stay_the_programs_problem(ex):
    for kind in ("garbage", "nested", "setup"):
        out = run(ex, H.FORGED_FRAMES, kind.encode())
        assert out.status in ("ok", "runtime_error"), (kind, out)
    with ex.session(H.FORGED_DURING_CALL) as s:
        first = s.call("f", [], timeout_s=5)
        again = s.call("f", [], timeout_s=5)
    assert first.status == again.status == "runtime_error" and first.value is None
    assert run(ex, "print('fine')").stdout == b"fine\n"


# ------------------------------------------------------------------------------------- after it all
def test_battery_then_normal_program_and_no_leaks():
    me = psutil.Process()
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = {p.pid for p in me.children(recursive=True)}
    tmp_before = set(glob.glob("/tmp/opsd-sandbox-*"))
    cgroups_before = set(glob.glob("/sys/fs/cgroup/*/opsd-sbx-%d-*" % os.getpid()) +
                         glob.glob("/sys/fs/cgroup/memory/**/opsd-sbx-%d-*" % os.getpid(), recursive=True))
    with Executor(2, limits=FAST) as ex1:
        battery = [(H.FORK_BOMB, b""), (H.MEMORY_BOMB, b""), (H.FORKED_MEMORY_BOMB, b""), (H.IGNORES_SIGNALS, b""), (H.HUGE_OUTPUT, b""),
                   (H.KILL_PARENT, b""), (H.ORPHAN, b"orphX"), (H.DEEP_RECURSION, b""), (H.IO_URING, b"")]
        endless = (H.FORK_BOMB, H.IGNORES_SIGNALS)  # the others end by themselves (loaded machines are slow)
        statuses = [run(ex1, code, stdin, timeout_s=1.0 if code in endless else 10.0).status for code, stdin in battery]
        assert statuses == ["time_limit", "memory_limit", "memory_limit", "time_limit", "output_limit", "ok", "ok",
                            "runtime_error", "ok"]
        out = run(ex1, "n = int(input())\nprint(sum(range(n)))", b"100\n")
        assert (out.status, out.stdout) == ("ok", b"4950\n")
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert {p.pid for p in me.children(recursive=True)} == children_before
    assert set(glob.glob("/tmp/opsd-sandbox-*")) == tmp_before
    cgroups_after = set(glob.glob("/sys/fs/cgroup/*/opsd-sbx-%d-*" % os.getpid()) +
                        glob.glob("/sys/fs/cgroup/memory/**/opsd-sbx-%d-*" % os.getpid(), recursive=True))
    assert cgroups_after == cgroups_before
    assert processes_named("orphX") == []
