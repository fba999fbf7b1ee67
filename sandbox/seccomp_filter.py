"""The seccomp filter of sandboxed programs, compiled to BPF in the trusted process with libseccomp.

Default-allow with explicit denies (EPERM) of the known holes: io_uring (its operations bypass seccomp, so
the setup call itself must fail), tracing and cross-process memory access, mounts and namespaces (also
through clone flags; clone3 answers ENOSYS so the C library falls back to the inspectable clone), kernel
modules/keys/BPF/perf, System V IPC and POSIX message queues (they would outlive the program), moving to
other CPUs (sched_setaffinity), and memory that no address-space limit counts: sockets of every family and
socket pairs (their buffers held 1.2 GiB for a process limited to 128 MiB) and memfds (written, never mapped:
900 MiB over 4 processes). Programs need none of them (asyncio's event loop, which makes a socket pair, does
not run). The program process loads the BPF bytes itself with prctl, after dropping its capabilities, so no
libseccomp is needed inside the sandbox.
"""

from __future__ import annotations

import errno
import tempfile

DENIED = (
    "io_uring_setup io_uring_enter io_uring_register "
    "ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp "
    "mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount fspick mount_setattr "
    "unshare setns "
    "bpf perf_event_open userfaultfd kexec_load kexec_file_load init_module finit_module delete_module "
    "keyctl add_key request_key "
    "reboot swapon swapoff acct quotactl syslog settimeofday clock_settime clock_adjtime adjtimex "
    "name_to_handle_at open_by_handle_at iopl ioperm uselib personality "
    "sethostname setdomainname vhangup fanotify_init lookup_dcookie "
    # System V IPC objects and POSIX message queues outlive their creator (the worker's programs share one
    # IPC namespace): none can be created.
    "shmget msgget semget mq_open "
    # A program stays on the CPU its worker was placed on (pinning is enforced, not advisory).
    "sched_setaffinity "
    # Memory outside RLIMIT_AS (socket buffers, unmapped memfd pages): nothing else would bound it without a
    # cgroup, and programs need none of these.
    "socket socketpair memfd_create memfd_secret"
).split()

NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
TIOCSTI = 0x5412


def build_bpf() -> tuple[bytes | None, str | None]:
    """Return (BPF program bytes, None), or (None, reason) when libseccomp is unavailable."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:  # OSError: the module loads but libseccomp.so does not
        return None, "pyseccomp/libseccomp unavailable (%s)" % e
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        deny = sc.ERRNO(errno.EPERM)
        for name in DENIED:
            try:
                f.add_rule(deny, name)
            except (RuntimeError, OSError, ValueError):  # a name this kernel/libseccomp does not know
                continue
        for flag in NAMESPACE_FLAGS.values():
            f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
        with tempfile.TemporaryFile() as tmp:
            f.export_bpf(tmp)
            tmp.seek(0)
            bpf = tmp.read()
    except Exception as e:  # noqa: BLE001 - any libseccomp failure means: no seccomp layer
        return None, "could not build the seccomp filter (%s)" % e
    if not bpf or len(bpf) % 8:
        return None, "libseccomp exported an empty or malformed filter"
    return bpf, None
