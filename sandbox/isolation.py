"""Which isolation layers this machine offers, and the command line of one sandbox worker."""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

LAYERS = ("bwrap", "seccomp", "pid_namespace", "uid_drop", "rlimits", "cgroup")
NOBODY = 65534
# The program's whole environment: fixed values, nothing is copied from the caller's environment.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How workers are started: the layers requested and the interpreter they run."""

    bwrap: str | None  # path of bubblewrap, None to run the fork server directly
    python: str
    as_nobody: bool  # start the worker as uid/gid 65534 (the caller is root)
    pidns: bool
    drop: str | None  # "caps" (inside bubblewrap's user namespace), "setuid" (root without it) or None
    bpf: bytes | None
    cgroup: bool  # a memory + pids cgroup per worker (optional: rlimits hold without it)
    missing: dict[str, str]  # layer -> why it is not available


def _world_accessible(path: str) -> bool:
    """True when uid 65534 can reach and read ``path`` (every parent directory searchable by others)."""
    p = Path(path).resolve()
    try:
        for parent in reversed(p.parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(p).st_mode & stat.S_IROTH)
    except OSError:
        return False


def find_python(as_nobody: bool) -> str:
    """The interpreter of the sandbox: this Python's base interpreter, else the system python3."""
    candidates = [getattr(sys, "_base_executable", None), sys.executable, "/usr/bin/python3", shutil.which("python3")]
    for c in candidates:
        if not c or not os.path.exists(c):
            continue
        real = os.path.realpath(c)
        if as_nobody and not _world_accessible(real):
            continue
        return real
    raise FileNotFoundError("no Python interpreter the sandbox user can read")


@functools.lru_cache(maxsize=8)
def python_prefixes(python: str) -> tuple[str, ...]:
    """Directories the interpreter needs (stdlib, its shared library), asked from the interpreter."""
    code = "import sys, sysconfig; print(sys.base_prefix); print(sysconfig.get_paths()['stdlib']); print(sysconfig.get_config_var('LIBDIR') or '')"
    out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30, env=SANDBOX_ENV)
    return tuple(line for line in out.stdout.splitlines() if line)


def bwrap_command(bwrap: str, python: str, source: str, *, tmpfs_bytes: int) -> list[str]:
    """bubblewrap around the fork server: every namespace unshared, an empty root with only read-only
    system libraries and the interpreter, a fresh /proc and /dev, a size-limited /tmp, no environment."""
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns",
           "--uid", str(NOBODY), "--gid", str(NOBODY),
           # Kept by the fork server only: per-program PID/mount namespaces need CAP_SYS_ADMIN in the
           # worker's user namespace; every program drops all capabilities before its code runs.
           "--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP",
           "--hostname", "sandbox"]
    for d in ("/usr/lib", "/usr/lib64", "/usr/libexec"):
        if os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    for d in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    cmd += ["--ro-bind", python, python]
    for d in python_prefixes(python)[1:]:
        if os.path.isdir(d) and not d.startswith("/usr/lib"):
            cmd += ["--ro-bind", d, d]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp",
            # The root (bubblewrap's tmpfs) is shared by every program of the worker: read-only, so no
            # program leaves files for the next; each program gets its own /tmp.
            "--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]
    for k, v in SANDBOX_ENV.items():
        cmd += ["--setenv", k, v]
    cmd += ["--chdir", "/tmp", python, "-I", "-S", "-c", source]
    return cmd


def direct_command(python: str, source: str) -> list[str]:
    return [python, "-I", "-S", "-c", source]


def make_plan(isolation: str, disable: frozenset[str]) -> Plan:
    """Decide the layers to request; the worker's self-test then confirms what really holds."""
    missing: dict[str, str] = {}
    root = os.geteuid() == 0
    if isolation == "none":
        for layer in LAYERS:
            if layer != "rlimits":
                missing[layer] = "isolation='none'"
        return Plan(None, find_python(False), False, False, None, None, False, missing)
    bwrap = shutil.which("bwrap") if "bwrap" not in disable else None
    if bwrap is None:
        missing["bwrap"] = "disabled" if "bwrap" in disable else "bubblewrap (bwrap) is not installed"
    python = find_python(root)  # root runs programs as uid 65534 (in bubblewrap or by setuid)
    if bwrap is not None:
        drop = "caps"
    elif root:
        drop = "setuid"
    else:
        drop = None
        missing["uid_drop"] = "not root and no bubblewrap: programs run as the caller's user"
    if "uid_drop" in disable:
        drop, missing["uid_drop"] = None, "disabled"
    pidns = "pid_namespace" not in disable
    if not pidns:
        missing["pid_namespace"] = "disabled"
    bpf = None
    if "seccomp" in disable:
        missing["seccomp"] = "disabled"
    else:
        from sandbox.seccomp_filter import build_bpf

        bpf, why = build_bpf()
        if bpf is None:
            missing["seccomp"] = why or "unavailable"
    cgroup = "cgroup" not in disable and cgroup_available() is None
    if not cgroup:
        missing["cgroup"] = "disabled" if "cgroup" in disable else cgroup_available() or "unavailable"
    return Plan(bwrap, python, root and bwrap is not None, pidns, drop, bpf, cgroup, missing)


# ------------------------------------------------------------------------------------------- cgroups
CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_PREFIX = "opsd-sbx-"


def _own_cgroup_dir(controller: str) -> str | None:
    """This process's directory in a cgroup v1 hierarchy (e.g. /sys/fs/cgroup/memory/some/path)."""
    try:
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                d = os.path.join(CGROUP_ROOT, controller, path.lstrip("/"))
                return d if os.path.isdir(d) else None
    except OSError:
        pass
    return None


def cgroup_available() -> str | None:
    """None when per-worker memory and pids cgroups (v1) can be made here, else why not."""
    for controller in ("memory", "pids"):
        d = _own_cgroup_dir(controller)
        if d is None:
            return "no cgroup v1 %s hierarchy" % controller
        if not os.access(d, os.W_OK):
            return "cannot create %s cgroups (not writable: %s)" % (controller, d)
    return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in glob.glob("/proc/%d/task/*/children" % p):
            try:
                todo.extend(int(c) for c in open(task).read().split())
            except OSError:
                pass
    return out


class WorkerCgroup:
    """A memory, a pids and (where available) a cpu cgroup holding one worker: caps the whole program (all
    its processes together), counts the kernel's OOM kills so an OOM-killed program is reported as
    memory_limit, and holds the worker to one core."""

    def __init__(self, tag: str):
        sweep_stale_cgroups()
        name = "%s%d-%s" % (_CGROUP_PREFIX, os.getpid(), tag)
        self.dirs = {c: os.path.join(_own_cgroup_dir(c), name) for c in ("memory", "pids")}
        cpu = _own_cgroup_dir("cpu")
        if cpu is not None and os.access(cpu, os.W_OK):
            self.dirs["cpu"] = os.path.join(cpu, name)
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        if "cpu" in self.dirs:  # one core per worker at most: a fork bomb cannot take the machine
            with open(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), "w") as f:
                f.write("100000")
            with open(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"), "w") as f:
                f.write("100000")
        self._memory = None
        self._oom_fd: int | None = None

    def add_tree(self, pid: int) -> None:
        """Move ``pid`` and its descendants (the idle fork server among them) into the cgroups."""
        for p in _descendants(pid):
            for d in self.dirs.values():
                try:
                    with open(os.path.join(d, "cgroup.procs"), "w") as f:
                        f.write(str(p))
                except ProcessLookupError:
                    pass

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        mem = self.dirs["memory"]
        if memory_bytes != self._memory:
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            if self._memory is not None and memory_bytes > self._memory:
                order.reverse()  # memsw must stay >= the memory limit at every step
            for fname in order:
                path = os.path.join(mem, fname)
                if fname.startswith("memory.memsw") and not os.path.exists(memsw):
                    continue
                with open(path, "w") as f:
                    f.write(str(memory_bytes))
            self._memory = memory_bytes
        with open(os.path.join(self.dirs["pids"], "pids.max"), "w") as f:
            f.write(str(pids))

    def oom_kills(self) -> int:
        """The kernel's OOM kills in the memory cgroup so far (read at every request: the file is kept open
        and re-read from offset 0, which regenerates it)."""
        try:
            if self._oom_fd is None:
                self._oom_fd = os.open(os.path.join(self.dirs["memory"], "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            text = os.pread(self._oom_fd, 4096, 0)
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith(b"oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        if self._oom_fd is not None:
            os.close(self._oom_fd)
            self._oom_fd = None
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes still leaving
                    time.sleep(0.02)


def sweep_stale_cgroups() -> None:
    """Remove empty cgroups left by executors whose process is gone (a crash skips their clean-up)."""
    for controller in ("memory", "pids", "cpu"):
        base = _own_cgroup_dir(controller)
        if base is None:
            continue
        for d in glob.glob(os.path.join(base, _CGROUP_PREFIX + "*")):
            try:
                owner = int(os.path.basename(d)[len(_CGROUP_PREFIX):].split("-")[0])
            except ValueError:
                continue
            if owner != os.getpid() and not os.path.exists("/proc/%d" % owner):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
