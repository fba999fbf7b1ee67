"""Which isolation layers this machine offers, and the command line of one sandbox worker."""

from __future__ import annotations

import dataclasses
import errno
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
    cgroup: int | None  # cgroup version of a memory + pids cgroup per worker (optional: rlimits hold without it)
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
        return Plan(None, find_python(False), False, False, None, None, None, missing)
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
    cgroup = None
    if "cgroup" in disable:
        missing["cgroup"] = "disabled"
    else:
        cgroup, why = cgroup_version()
        if cgroup is None:
            missing["cgroup"] = why or "unavailable"
    return Plan(bwrap, python, root and bwrap is not None, pidns, drop, bpf, cgroup, missing)


def limits_line(layers: dict[str, bool], cgroup_version: int | None, why_no_cgroup: str | None, *, pinned: bool) -> str:
    """The start-up line on what bounds a program: which limits hold with these layers, and which do not."""
    hold = ["CPU time per run or call (all the program's threads and processes)",
            "address space per process (memory_mb)", "file size (file_bytes)", "open files"]
    lost = []
    if layers.get("seccomp"):
        hold.append("no sockets, socket pairs or memfds (memory the address space does not count)")
    else:
        lost.append("memory in socket buffers and memfds (seccomp is off)")
    if cgroup_version:
        hold[1:1] = ["memory of all the program's processes together, their number and one core per worker "
                     "(cgroup v%d)" % cgroup_version]
        return "sandbox limits that hold: " + "; ".join(hold) + ("; do NOT hold: " + "; ".join(lost) if lost else "")
    if layers.get("uid_drop"):
        hold.append("processes (n_procs, as RLIMIT_NPROC of the sandbox's user)")
    else:
        lost.append("the number of processes (RLIMIT_NPROC does not bind the caller's user)")
    if pinned and layers.get("seccomp"):
        hold.append("one core per worker (CPU affinity the program cannot change)")
    else:
        lost.append("one core per worker (a program's processes may use every CPU)")
    lost[:0] = ["memory of the program's processes together (each may use memory_mb, up to n_procs of them)",
                "memory the kernel holds for it (pipe buffers, page tables)"]
    return "sandbox limits without a cgroup (%s) that hold: %s; do NOT hold: %s" % (
        why_no_cgroup or "unavailable", "; ".join(hold), "; ".join(lost))


# ------------------------------------------------------------------------------------------- cgroups
CGROUP_ROOT = "/sys/fs/cgroup"  # where cgroup v1 hierarchies are mounted
PROC_SELF = "/proc/self"  # (tests point these two at a fake hierarchy)
_CGROUP_PREFIX = "opsd-sbx-"
_TRUSTED_PREFIX = "opsd-trusted-"  # (cgroup v2) the leaf this process moves to so its cgroup can have children
_V1_CONTROLLERS = ("memory", "pids")


def _own_cgroup_dir(controller: str) -> str | None:
    """This process's directory in a cgroup v1 hierarchy (e.g. /sys/fs/cgroup/memory/some/path)."""
    try:
        with open(os.path.join(PROC_SELF, "cgroup")) as f:
            lines = f.read().splitlines()
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                d = os.path.join(CGROUP_ROOT, controller, path.lstrip("/"))
                return d if os.path.isdir(d) else None
    except OSError:
        pass
    return None


def _v2_own_dir() -> str | None:
    """This process's directory in the cgroup v2 (unified) hierarchy, from /proc/self/cgroup ("0::/path") and
    the cgroup2 mount in /proc/self/mountinfo."""
    try:
        with open(os.path.join(PROC_SELF, "cgroup")) as f:
            path = next((line.rstrip("\n")[3:] for line in f if line.startswith("0::")), None)
        with open(os.path.join(PROC_SELF, "mountinfo")) as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in mounts:
        sep = fields.index("-") if "-" in fields else -1
        if path is None or sep < 0 or fields[sep + 1] != "cgroup2":
            continue
        root, mount_point = fields[3], fields[4]
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        d = os.path.normpath(os.path.join(mount_point, rel.lstrip("/")))
        if os.path.isdir(d):
            return d
    return None


def _read_words(path: str) -> set[str]:
    try:
        with open(path) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _v1_why() -> str | None:
    """None when per-worker memory and pids cgroups can be made in cgroup v1 hierarchies, else why not."""
    for controller in _V1_CONTROLLERS:
        d = _own_cgroup_dir(controller)
        if d is None:
            return "no cgroup v1 %s hierarchy" % controller
        if not os.access(d, os.W_OK):
            return "cannot create %s cgroups (not writable: %s)" % (controller, d)
    return None


_v2_base_cache: dict[int, tuple[str, frozenset[str]]] = {}  # pid -> (base, controllers enabled below it)


def _v2_base() -> tuple[str | None, frozenset[str] | str]:
    """(the cgroup v2 directory under which worker cgroups are made, the controllers enabled below it), or
    (None, why not).

    A delegated subtree: this process's own cgroup, writable, with the memory and pids controllers. Controllers
    reach a cgroup's children only once it holds no process itself ("no internal processes"), so this process
    first moves into a leaf of its own (``opsd-trusted-<pid>``) when it is the only process there, as systemd's
    delegation asks of a service; a cgroup shared with other processes cannot be used. Done once per process."""
    if os.getpid() in _v2_base_cache:
        return _v2_base_cache[os.getpid()]
    own = _v2_own_dir()
    if own is None:
        return None, "no cgroup v2 hierarchy"
    if os.path.basename(own) == _TRUSTED_PREFIX + str(os.getpid()):
        own = os.path.dirname(own)  # moved there before (e.g. by an earlier executor of this process)
    available = _read_words(os.path.join(own, "cgroup.controllers"))
    missing = {"memory", "pids"} - available
    if missing:
        return None, "cgroup v2: the %s controller%s not delegated to %s" % (
            " and ".join(sorted(missing)), "s are" if len(missing) > 1 else " is", own)
    if not os.access(own, os.W_OK) or not os.access(os.path.join(own, "cgroup.subtree_control"), os.W_OK):
        return None, "cgroup v2: %s is not writable (no delegated subtree)" % own
    want = frozenset({"memory", "pids"} | ({"cpu"} & available))
    if not want <= _read_words(os.path.join(own, "cgroup.subtree_control")):
        procs = _read_words(os.path.join(own, "cgroup.procs"))
        is_root = not os.path.exists(os.path.join(own, "cgroup.type"))  # the root cgroup may hold processes
        if not is_root and procs - {str(os.getpid())}:
            return None, ("cgroup v2: %s holds other processes (%d), so its controllers cannot reach a child cgroup; "
                          "give the trainer a delegated cgroup of its own" % (own, len(procs - {str(os.getpid())})))
        try:
            if not is_root and procs:
                leaf = os.path.join(own, _TRUSTED_PREFIX + str(os.getpid()))
                os.makedirs(leaf, exist_ok=True)
                with open(os.path.join(leaf, "cgroup.procs"), "a") as f:
                    f.write("%d\n" % os.getpid())
            with open(os.path.join(own, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in sorted(want)))
        except OSError as e:
            return None, "cgroup v2: could not enable %s below %s (%s)" % (
                ", ".join(sorted(want)), own, e.strerror or e)
    _v2_base_cache[os.getpid()] = own, want
    return own, want


def cgroup_available() -> str | None:
    """None when per-worker memory and pids cgroups can be made here (cgroup v1, else a delegated cgroup v2
    subtree), else why not."""
    return cgroup_version()[1]


def cgroup_version() -> tuple[int | None, str | None]:
    """(1 or 2, None): which cgroup hierarchy holds the workers' cgroups; (None, why) when neither can."""
    why_v1 = _v1_why()
    if why_v1 is None:
        return 1, None
    base, why_v2 = _v2_base()
    if base is not None:
        return 2, None
    return None, "%s; %s" % (why_v1, why_v2)


def _descendants(pid: int) -> list[int]:
    """``pid`` and its descendants. Fails closed: a child list that cannot be read (other than of a process
    that has ended) raises, so no process is left outside the cgroup unnoticed."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in glob.glob("/proc/%d/task/*/children" % p):
            try:
                with open(task) as f:
                    todo.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
                pass
    return out


class WorkerCgroup:
    """The cgroups of one worker: memory and pids (and, where available, cpu), in cgroup v1 hierarchies or one
    cgroup v2 directory. Caps the whole program (all its processes together), counts the kernel's OOM kills
    so an OOM-killed program is reported as memory_limit, and holds the worker to one core."""

    def __init__(self, tag: str):
        self.version, why = cgroup_version()
        if self.version is None:
            raise OSError("no cgroup: %s" % why)
        sweep_stale_cgroups()
        name = "%s%d-%s" % (_CGROUP_PREFIX, os.getpid(), tag)
        if self.version == 1:
            self.dirs = {c: os.path.join(_own_cgroup_dir(c), name) for c in _V1_CONTROLLERS}
            cpu = _own_cgroup_dir("cpu")
            if cpu is not None and os.access(cpu, os.W_OK):
                self.dirs["cpu"] = os.path.join(cpu, name)
        else:
            base, controllers = _v2_base()
            d = os.path.join(base, name)
            self.dirs = {c: d for c in controllers}
        for d in set(self.dirs.values()):
            os.makedirs(d, exist_ok=True)
        if "cpu" in self.dirs:  # one core per worker at most: a fork bomb cannot take the machine
            if self.version == 1:
                self._write("cpu", "cpu.cfs_period_us", "100000")
                self._write("cpu", "cpu.cfs_quota_us", "100000")
            else:
                self._write("cpu", "cpu.max", "100000 100000")
        self._memory = None
        self._oom_fd: int | None = None

    def _write(self, controller: str, fname: str, value: str) -> None:
        with open(os.path.join(self.dirs[controller], fname), "w") as f:
            f.write(value)

    def add_tree(self, pid: int) -> None:
        """Move ``pid`` and its descendants (the idle fork server among them) into the cgroups, then check that
        each of them is there (a process the cgroup does not hold would escape its limits)."""
        tree = _descendants(pid)
        for p in tree:
            for d in set(self.dirs.values()):
                try:
                    with open(os.path.join(d, "cgroup.procs"), "a") as f:  # (as `echo PID >> cgroup.procs`)
                        f.write("%d\n" % p)
                except ProcessLookupError:
                    pass
        for d in set(self.dirs.values()):
            held = _read_words(os.path.join(d, "cgroup.procs"))
            lost = [p for p in tree if str(p) not in held and os.path.exists("/proc/%d" % p)]
            if lost:
                raise OSError("processes %s are not in the cgroup %s" % (lost, d))

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        if memory_bytes != self._memory:
            if self.version == 1:
                memsw = os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")
                order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
                if self._memory is not None and memory_bytes > self._memory:
                    order.reverse()  # memsw must stay >= the memory limit at every step
                for fname in order:
                    if fname.startswith("memory.memsw") and not os.path.exists(memsw):
                        continue
                    self._write("memory", fname, str(memory_bytes))
            else:
                self._write("memory", "memory.max", str(memory_bytes))
                if os.path.exists(os.path.join(self.dirs["memory"], "memory.swap.max")):
                    self._write("memory", "memory.swap.max", "0")  # (v2 counts swap apart: none at all)
            self._memory = memory_bytes
        self._write("pids", "pids.max", str(pids))

    def oom_kills(self) -> int:
        """The kernel's OOM kills in the memory cgroup so far (read at every request: the file is kept open
        and re-read from offset 0, which regenerates it). Fails closed: a count that cannot be read raises
        OSError (the executor then reports a sandbox failure rather than guess)."""
        if self._oom_fd is None:
            fname = "memory.oom_control" if self.version == 1 else "memory.events"
            self._oom_fd = os.open(os.path.join(self.dirs["memory"], fname), os.O_RDONLY | os.O_CLOEXEC)
        text = os.pread(self._oom_fd, 4096, 0)
        for line in text.splitlines():
            if line.startswith(b"oom_kill "):
                return int(line.split()[1])
        raise OSError("no oom_kill count in the memory cgroup of %s" % self.dirs["memory"])

    def remove(self) -> None:
        if self._oom_fd is not None:
            os.close(self._oom_fd)
            self._oom_fd = None
        for d in set(self.dirs.values()):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:  # gone already (or not a cgroup directory)
                        break
                    time.sleep(0.02)  # processes still leaving


def sweep_stale_cgroups() -> None:
    """Remove empty cgroups left by executors whose process is gone (a crash skips their clean-up)."""
    bases = [_own_cgroup_dir(c) for c in ("memory", "pids", "cpu")] + [_v2_base_cache.get(os.getpid(), (None,))[0]]
    for base in bases:
        if base is None:
            continue
        for prefix in (_CGROUP_PREFIX, _TRUSTED_PREFIX):
            for d in glob.glob(os.path.join(base, prefix + "*")):
                try:
                    owner = int(os.path.basename(d)[len(prefix):].split("-")[0])
                except ValueError:
                    continue
                if owner != os.getpid() and not os.path.exists("/proc/%d" % owner):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass
