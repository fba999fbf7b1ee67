"""Confinement of a program's process (inside the sandbox, standard library only): what a fresh process does
to itself, in order, before it reads its program: its own mount (and IPC) namespace, /proc and a size-limited
scratch tmpfs, its descriptors, rlimits, an unprivileged uid with no capabilities, the seccomp filter. And the
clone(2) that starts it as PID 1 of a new PID namespace. This file runs inside the sandbox (see
``sandbox/pool.py:worker_source``).
"""

import ctypes
import io
import os
import resource
import signal
import sys

NOBODY = 65534
MAX_RECURSION = 100_000  # programs may raise the limit up to this; the main stack is sized for it
STACK_BYTES = 1 << 30
THREAD_STACK_BYTES = 8 << 20

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_PARENT = 0x00020000, 0x08000000, 0x20000000, 0x00008000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 38, 22, 24, 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 47, 4, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4


_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def check_syscall(res, what):
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Prepared:
    """ctypes objects built once in the fork server (building them costs more than the system calls)."""

    def __init__(self, bpf):
        self.cap_header, self.cap_data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        self.bpf_buf = ctypes.create_string_buffer(bpf, len(bpf)) if bpf else None
        self.bpf_prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self.bpf_buf)) if bpf else None
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last_cap = int(f.read())
        except (OSError, ValueError):
            last_cap = 63
        self.caps = [ctypes.c_ulong(cap) for cap in range(max(last_cap, 40) + 1)]


def drop_inheritable_capabilities(prepared):
    """Empty the capability bounding and ambient sets: no process started from this one can gain a capability
    by execve. Done once, by the template (needs CAP_SETPCAP): every program's process inherits them empty,
    while the template keeps the capabilities it holds (a new PID namespace and the program's mounts need
    CAP_SYS_ADMIN), which each program's process then drops (``_drop_capabilities``)."""
    c, zero = libc(), ctypes.c_ulong(0)
    for cap in prepared.caps:
        c.prctl(PR_CAPBSET_DROP, cap, zero, zero, zero)
    c.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), zero, zero, zero)


def _drop_capabilities(prepared):
    """Empty the effective, permitted and inheritable sets (the bounding and ambient sets are empty already)."""
    check_syscall(libc().capset(ctypes.byref(prepared.cap_header), prepared.cap_data), "capset")


def _load_seccomp(prepared):
    c, zero = libc(), ctypes.c_ulong(0)
    check_syscall(c.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero), "no_new_privs")
    check_syscall(c.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prepared.bpf_prog), zero, zero), "seccomp")


def _set_rlimits(limits):
    def lim(which, soft, hard=None):
        hard = soft if hard is None else hard
        resource.setrlimit(which, (soft, hard))

    cpu = max(1, int(limits["cpu_s"] + 0.999))
    lim(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL one second later
    lim(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    # RLIMIT_FSIZE comes last (limit_file_size).
    lim(resource.RLIMIT_NOFILE, 256)
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_MEMLOCK, 0)
    lim(resource.RLIMIT_MSGQUEUE, 0)
    # RLIMIT_NPROC counts this uid's processes in the worker's user namespace: the worker's own three
    # (bubblewrap's init, the fork server, its template) are included.
    lim(resource.RLIMIT_NPROC, limits["n_procs"] + 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = STACK_BYTES if hard == resource.RLIM_INFINITY else min(hard, STACK_BYTES)
    resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def enter_program(cfg, limits, fds, scratch):
    """Turn this fresh process (B) into the sandboxed program's process. Order matters."""
    os.setsid()
    c = libc()
    if cfg["mounts"]:
        if cfg.get("host_root"):
            # A copy of the host's mounts (no bubblewrap): private first, so nothing mounted here reaches the
            # host; the host's world-writable directories other than the scratch dir become read-only.
            check_syscall(c.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "make / private")
            for shared in (b"/dev/shm", b"/var/tmp"):
                if os.path.isdir(shared):
                    check_syscall(c.mount(b"tmpfs", shared, b"tmpfs", ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV), b"size=4k"),
                           "mount %s" % shared.decode())
        check_syscall(c.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), None), "mount /proc")
        size = ("size=%d,mode=0700" % max(16 << 20, 4 * limits["file_bytes"])).encode()
        check_syscall(c.mount(b"tmpfs", scratch.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), size), "mount scratch")
        if cfg.get("host_root"):
            os.chown(scratch, NOBODY, NOBODY)  # the program's uid owns its scratch dir
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]  # so no source is overwritten below
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(fds), 1 << 16)
    os.chdir(scratch)
    os.setpriority(os.PRIO_PROCESS, 0, max(0, os.getpriority(os.PRIO_PROCESS, 0)))  # the server runs at -10
    _set_rlimits(limits)
    import _thread

    # New threads otherwise get glibc's default stack, the main thread's 1 GiB RLIMIT_STACK: beyond
    # RLIMIT_AS, so no thread could start. A program may still ask for more with threading.stack_size.
    _thread.stack_size(THREAD_STACK_BYTES)
    if cfg["drop"] == "caps":  # bubblewrap already runs us as an unprivileged uid in its user namespace
        _drop_capabilities(cfg["prepared"])
    elif cfg["drop"] == "setuid":  # no user namespace: root drops to nobody (also clears capabilities)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    if cfg["bpf"]:
        _load_seccomp(cfg["prepared"])
    # The environment is the server's own, set from cfg at its start (HOME is /tmp, the scratch dir with
    # mounts); the server holds no random state to share (random is not preloaded).
    if not cfg["mounts"]:
        os.environ["HOME"] = scratch
    import _signal  # (signal.signal's enum conversions would touch more of the server's pages)

    for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGHUP):
        _signal.signal(sig, _signal.SIG_DFL)
    sys.stdin, sys.stdout, sys.stderr = _STD_STREAMS
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STD_STREAMS
    sys.argv = ["main.py"]
    real_setrecursionlimit = sys.setrecursionlimit
    sys.setrecursionlimit = lambda n: real_setrecursionlimit(max(50, min(int(n), MAX_RECURSION)))


_STD_STREAMS = []  # the programs' stdin, stdout and stderr objects, built once by the server (``prepare_streams``)


def prepare_streams():
    """Build every program's stdin, stdout and stderr objects once, in the server, on fds 0, 1 and 2 (in the
    server its request and reply pipes and its stderr, never used through them; in a program its stdin file
    and output pipes). A program's stdin is a seekable file (memfd, or /dev/null in call sessions): the
    stdin object is built while fd 0 is one, since it notes at construction whether its file can seek."""
    saved, template = os.dup(0), os.memfd_create("stdin")
    try:
        os.dup2(template, 0)
        stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(template)
    _STD_STREAMS[:] = [
        stdin,
        io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8"),
        io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                         errors="backslashreplace", line_buffering=True),
    ]


def limit_file_size(file_bytes):
    """RLIMIT_FSIZE, set last: the process that sets it up writes no file, the program writes at most this."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))


_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
_pydll = None


def clone_for_parent(new_pid_namespace):
    """``os.fork()`` whose child is a child of this process's PARENT (CLONE_PARENT), and with
    ``new_pid_namespace`` PID 1 of a new PID namespace: clone(2) wrapped in CPython's own before/after-fork
    hooks as ``os.fork`` does. The fork server's template calls it: the program's process is a copy of the
    template (which never held a request) and a child of the fork server (which waits for it, reads its
    rusage and its CPU clock). One clone per program: unshare(CLONE_NEWPID) would act only once per process
    (and setns back to the worker's namespace is not permitted inside bubblewrap's nested user namespace)."""
    global _pydll
    if _SYS_CLONE is None:
        raise OSError(38, "no clone(2) number known for %s" % os.uname().machine)
    if _pydll is None:  # a PyDLL call keeps the GIL, as os.fork does across fork()
        _pydll = ctypes.PyDLL(None, use_errno=True)
        _pydll.syscall.restype = ctypes.c_long
    flags = CLONE_PARENT | (CLONE_NEWPID if new_pid_namespace else 0) | signal.SIGCHLD
    api, zero = ctypes.pythonapi, ctypes.c_ulong(0)
    api.PyOS_BeforeFork()
    pid = _pydll.syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(flags), zero, zero, zero, zero)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, "clone: %s" % os.strerror(err))
    return pid
