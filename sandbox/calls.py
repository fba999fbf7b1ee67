"""A call session's process B (inside the sandbox, standard library only): one fresh child per test.

B is confined like every program's process (``sandbox/confine.py``) and holds the program's compiled code, but
never runs any of it: for each call, or for the calls of one test (which share one time limit: a check test's
calls), it forks a child C, which runs the top-level code, then that call, or the test's calls one after another
as they come (``sandbox/program.py:run_call``), and ends with the test. So every test starts from the same state,
B's, which no test can change: nothing a test computes (in a global, a thread, a process, a file) is there for
the next, and no CPU time can be pooled across tests, nor across calls that have limits of their own. Within a
test, its calls share C as they share its limit: C's CPU time from its start to its end, between and after the
calls included, is the test's (``sandbox/runner.py``). The program could not be trusted to give control back
after its top-level code (it may never return, or rewrite the interpreter's memory through ctypes): a copy of
the process taken after it ran would be the program's, serving its own calls.

What C could share with a later C, and how it is closed:
- C's processes: B is PID 1 of the program's PID namespace (else a child subreaper): after each call (a test's
  last) it kills every other process there and reaps them, so B is alone (one thread, no process below it)
  between tests.
- C's descriptors: its stdin (a fresh /dev/null), stdout, stderr, answer channel and, in a test, the channel of
  its next calls (fd 3) are pipes made for that C, which B relays to and from the fork server; C holds no
  descriptor of B's, so no state of an open file (flags, owner, locks, a pipe's size) outlives the test.
- B's memory, which every C inherits: no byte a call writes becomes a Python object in B. Output and answers
  pass through one buffer, zeroed after each call; the scratch dir is emptied with getdents64/unlinkat on
  that buffer, and its mode, times and extended attributes are reset. What is left of a call in B are
  integers (lengths, pids, exit statuses), like the timing that every design leaves.
- The scratch dir (/tmp: its own tmpfs with mounts, else a directory of the worker's): emptied after each C
  (with bubblewrap and no mounts, the worker's /tmp around it too). With mounts it is the only place a
  program can write; without them, a program may write wherever its uid may, and calls share that as
  separate programs do (those set-ups lack other layers too: ``sandbox/isolation.py``).
- System V IPC, message queues, sockets, memfds: denied by the seccomp filter (``sandbox/seccomp_filter.py``);
  without it, a session's calls share the program's IPC namespace.
- Kernel counters (the next pid in the program's namespace, inode numbers) move with what a call creates and
  can be read by a later call: a covert channel whose every bit costs the sending call about twice the work
  of the bit before (2**k processes or files for k bits), billed to its test; not closed.

Per call B writes on fd 4: the answer, if C gave one (a frame ``{"answer": 1}`` followed by C's own frame,
length prefix and header, relayed byte for byte without being parsed: the fork server reads it as untrusted),
then ``{"done": 1, ...}`` once it is alone again, or, for a call of a test whose C answered and lives on, at
once (``ended``: C's exit code when it ended without a whole answer; ``maxrss``: its peak memory). A request
``{"end": 1}`` ends the test's C (what it wrote since its last answer goes out as output, never as an answer);
``{"done": 1}`` follows once B is alone. B's own CPU time between tests is nil: the fork server checks it.
"""

import ctypes
import errno
import mmap
import os
import select
import signal
import struct

import _signal

from sandbox.confine import PR_SET_CHILD_SUBREAPER, check_syscall, libc
from sandbox.program import SETUP_FAILED, compile_program, format_error, run_call
from sandbox.wire import MAX_PROGRAM_FRAME, pack_frame, read_frame, write_all

BUFFER_BYTES = 1 << 16
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine)
_AT_REMOVEDIR = 0x200
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ANSWER = pack_frame({"answer": 1})


class _Buffer:
    """B's one buffer for what calls write (their output, answers, file names), zeroed after each call."""

    def __init__(self):
        # Its own pages, emptied by dropping them (``zero``): a call touches only the pages it uses, each zero.
        self.data = mmap.mmap(-1, BUFFER_BYTES)
        self.view = memoryview(self.data)
        self.c_array = (ctypes.c_char * BUFFER_BYTES).from_buffer(self.data)
        self.addr = ctypes.addressof(self.c_array)
        self.zeros = bytes(BUFFER_BYTES)
        # What goes to fd 4, held until the call is done (one write, one wake-up of the fork server, for a
        # small answer and the report) or while it fits.
        self.pending, self.n_pending = bytearray(BUFFER_BYTES), 0

    def zero(self):
        self.data.madvise(mmap.MADV_DONTNEED)

    def send(self, data):
        """Queue ``data`` (bytes-like) for fd 4."""
        n = len(data)
        if self.n_pending + n > BUFFER_BYTES:
            self.flush()
        if n > BUFFER_BYTES:
            write_all(4, data)
        else:
            self.pending[self.n_pending:self.n_pending + n] = data
            self.n_pending += n

    def flush(self):
        write_all(4, memoryview(self.pending)[:self.n_pending])
        self.pending[:self.n_pending] = self.zeros[:self.n_pending]
        self.n_pending = 0


def serve_calls(code, cfg, scratch):
    """B, call mode: per request on fd 3 (a call's target and arguments), a child runs the call; B relays what it
    writes and reports on fd 4. A call marked ``keep`` (a call of one test, whose calls share its time limit)
    goes to the test's child, started by its first call and kept until a request ``{"end": 1}``; any other call
    is a child of its own. Never returns."""
    c = libc()
    if not cfg["pidns"]:  # orphans of a call become B's children, not the fork server's
        check_syscall(c.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
    # No handler of B's ever runs a signal a call's process sends (without a PID namespace it can signal B).
    program_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    max_fds = _max_fds()
    buf = _Buffer()
    around = cfg["scratch_root"] if not cfg["mounts"] and cfg.get("wipe_scratch_root") else None
    compiled = None
    kept = None  # the child serving the current test's calls
    while True:
        request = read_frame(3)
        if request is None:
            os._exit(0)
        header = request[0]
        if header.get("end"):  # the test's last call was made: its child ends with everything it started
            done = kept.end() if kept is not None else {"done": 1}
            kept = None
        else:
            if compiled is None:
                try:
                    compiled = compile_program(code)
                except MemoryError:
                    write_all(4, pack_frame({"done": 1, "status": "memory_limit", "error": "MemoryError"}))
                    os._exit(1)
                except BaseException as e:
                    write_all(4, pack_frame({"done": 1, "status": "runtime_error", "error": format_error(e), "fatal": True}))
                    os._exit(1)
            keep = bool(header.get("keep"))
            if kept is not None and (not keep or kept.exited()):  # (one that ended after its answer: a fresh one)
                kept.end()
                kept = None
            if kept is None:
                call = _Call(compiled, header, program_mask, pidns=cfg["pidns"], buf=buf, max_fds=max_fds, keep=keep)
            else:
                call = kept
                call.send(header)
            done = call.relay()
            kept = call if keep and call.alive else None
        if kept is None:
            try:
                _reset_scratch(scratch, around, buf)
            except OSError as e:  # what a call left could reach the next: the session ends
                done = {"done": 1, "status": "runtime_error", "fatal": True,
                        "error": "the program's scratch dir could not be emptied (%s)" % (errno.errorcode.get(e.errno, e.errno),)}
        buf.zero()
        buf.send(pack_frame(done))
        buf.flush()


class _Call:
    """C, the child that runs one call (or, with ``keep``, the calls of one test), and B's ends of its pipes."""

    def __init__(self, compiled, header, program_mask, pidns, buf, max_fds, keep):
        self.pidns, self.buf = pidns, buf
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        resp_r, resp_w = os.pipe()
        call_r, self.call_w = os.pipe() if keep else (None, None)
        pid = os.fork()
        if pid == 0:
            try:
                null = os.open(os.devnull, os.O_RDONLY)
                for fd, target in ((null, 0), (out_w, 1), (err_w, 2), (resp_w, 4)):
                    os.dup2(fd, target)
                if call_r is not None:  # its next calls' requests
                    os.dup2(call_r, 3)
                else:
                    os.close(3)
                os.closerange(5, max_fds)
                # (not signal.pthread_sigmask: it turns the old mask into Signals members, an exception raised for
                # each real-time signal, a large share of a call's process's start-up)
                _signal.pthread_sigmask(signal.SIG_SETMASK, program_mask)
            except BaseException:
                os._exit(SETUP_FAILED)
            try:
                run_call(compiled, header, more=keep)
            finally:  # (it ends the process itself; never back into B's loop, whatever happened)
                os._exit(1)
        for fd in (out_w, err_w, resp_w, call_r):
            if fd is not None:
                os.close(fd)
        self.pid, self.pidfd = pid, os.pidfd_open(pid)
        self.out_r, self.err_r, self.resp_r = out_r, err_r, resp_r
        self.alive = True  # C has not ended (as far as B has seen)

    def send(self, header):
        """The test's next call, to C (blocks while C does not read: the fork server's wall clock ends that)."""
        try:
            write_all(self.call_w, pack_frame(header))
        except OSError:  # C has ended: ``relay`` reports it
            pass

    def exited(self):
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def relay(self):
        """Relay C's output to fds 1 and 2 and its answer (one frame) to fd 4 until the answer is whole or C has
        ended. C is then ended with every process below B, and what is left relayed, unless it is kept (a call of
        a test, answered) and still running. Returns the ``done`` report."""
        view = self.buf.view
        poller = select.poll()
        for fd in (self.out_r, self.err_r, self.resp_r, self.pidfd):
            poller.register(fd, select.POLLIN)
        sinks = {self.out_r: 1, self.err_r: 2}
        state = _Answer(self.buf)
        exited = False
        while not exited and not state.whole:
            for fd, _ in poller.poll():
                if fd == self.pidfd:
                    exited = True
                    continue
                if fd == self.resp_r:
                    if not state.relay(self.resp_r):
                        poller.unregister(fd)
                    continue
                n = os.readv(fd, [view])
                if n:
                    write_all(sinks[fd], view[:n])
                else:
                    poller.unregister(fd)
        if state.whole and self.call_w is not None and not exited:
            # Kept for the test's next call: what C wrote before its answer is in the pipes already.
            for fd in sinks:
                os.set_blocking(fd, False)
            try:
                self._drain(sinks)
            finally:
                for fd in sinks:
                    os.set_blocking(fd, True)
            return {"done": 1}
        report = {"done": 1}
        if exited and not state.whole:  # C ended by itself, maybe before its answer was read: its status, peak memory
            _, status, rusage = os.wait4(self.pid, 0)
            report.update(ended=os.waitstatus_to_exitcode(status), maxrss=rusage.ru_maxrss)
        self._end_all(sinks)
        while not state.whole and state.relay(self.resp_r):
            pass
        if state.whole:  # answered (C's exit after its answer is no failure)
            report = {"done": 1}
        state.pad()
        self._close()
        return report

    def end(self):
        """End C and every process below B (what it wrote since its last answer is relayed as output, never as an
        answer). Returns the ``done`` report."""
        self._end_all({self.out_r: 1, self.err_r: 2})
        view = self.buf.view
        while os.readv(self.resp_r, [view]):
            pass
        self._close()
        return {"done": 1}

    def _end_all(self, sinks):
        _end_all_below(self.pidns)
        self.alive = False
        self._drain(sinks)  # every writer has ended: what is left in the pipes is all there is

    def _drain(self, sinks):
        """Relay what is in each pipe to its sink, until its end (or, on a pipe set non-blocking, until it is
        empty for now)."""
        view = self.buf.view
        for fd, sink in sinks.items():
            try:
                while True:
                    n = os.readv(fd, [view])
                    if not n:
                        break
                    write_all(sink, view[:n])
            except BlockingIOError:
                pass

    def _close(self):
        for fd in (self.pidfd, self.out_r, self.err_r, self.resp_r, self.call_w):
            if fd is not None:
                os.close(fd)
        self.pidfd = self.out_r = self.err_r = self.resp_r = self.call_w = None


def _max_fds():
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # (no descriptor of B's is above it)


class _Answer:
    """C's answer frame, relayed to fd 4 as it arrives: its 4-byte length, then that many bytes, never parsed."""

    def __init__(self, buf):
        self.buf, self.view, self.started, self.whole = buf, buf.view, False, False
        self.prefix = bytearray(4)
        self.got = 0  # bytes of the prefix read
        self.left = None  # bytes of the header still to relay

    def relay(self, fd):
        """Read once from ``fd``; False at end of file."""
        if self.left is None:
            n = os.readv(fd, [memoryview(self.prefix)[self.got:]])
            if not n:
                return False
            if not self.started:
                self.buf.send(_ANSWER)
                self.started = True
            self.buf.send(memoryview(self.prefix)[self.got:self.got + n])
            self.got += n
            if self.got == 4:
                self.left = min(struct.unpack(">I", self.prefix)[0], MAX_PROGRAM_FRAME + 1)
                self.prefix[:] = b"\0\0\0\0"
                self.whole = self.left == 0
            return True
        n = os.readv(fd, [self.view[:min(self.left, BUFFER_BYTES)]])
        if not n:
            return False
        self.buf.send(self.view[:n])
        self.left -= n
        # Past the fork server's cap, the frame is garbled there already: nothing more is worth relaying.
        self.whole = self.left == 0 or self.left > MAX_PROGRAM_FRAME
        return True

    def pad(self):
        """An answer cut short (its writers ended): completed with spaces so the channel stays in frames (the
        fork server then reads a cut JSON text: garbled)."""
        if not self.started or self.whole:
            return
        if self.left is None:
            self.buf.send(b"\0" * (4 - self.got))
            return
        while self.left > 0:
            n = min(self.left, BUFFER_BYTES)
            self.view[:n] = b" " * n
            self.buf.send(self.view[:n])
            self.left -= n


def _end_all_below(pidns):
    """Kill every process below B and reap them all: afterwards B is alone. B is PID 1 of the program's PID
    namespace (``kill(-1)`` reaches every other process there), else a child subreaper (every orphan of a call
    stays below it)."""
    while True:
        if pidns:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for child in _children():
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED)
        except ChildProcessError:
            return


def _children():
    pid = os.getpid()
    with open("/proc/%d/task/%d/children" % (pid, pid), "rb") as f:
        return [int(x) for x in f.read().split()]


# ------------------------------------------------------------------------------------------------ scratch dir
def _reset_scratch(scratch, around, buf):
    """Empty the scratch dir (and, when a call could write there too, the directory around it), then reset the
    scratch dir's mode, times and extended attributes: nothing a call wrote there reaches the next."""
    if around is not None:
        fd = os.open(around, _DIR_FLAGS)
        try:
            _empty(fd, buf, keep_ino=os.stat(scratch).st_ino)
        finally:
            os.close(fd)
    fd = os.open(scratch, _DIR_FLAGS)
    try:
        os.fchmod(fd, 0o700)
        _empty(fd, buf)
        _drop_xattrs(fd, buf)
        os.utime(fd, ns=(0, 0))
    finally:
        os.close(fd)


def _empty(top, buf, keep_ino=None):
    """Remove everything in the directory open as ``top``, at any depth: its entries are read into ``buf`` with
    getdents64 and removed by address (no name becomes a Python object in B)."""
    c = libc()
    stack = [top]
    while stack:
        fd = stack[-1]
        sub = _empty_level(c, fd, buf, keep_ino if fd == top else None)
        if sub is not None:
            stack.append(sub)
            continue
        stack.pop()
        if fd != top:
            os.close(fd)  # its parent's next pass removes it, empty now


def _empty_level(c, fd, buf, keep_ino):
    """Remove the entries of ``fd`` that are not non-empty directories; the first such directory is opened
    (made searchable first) and returned, to be emptied before this one is read again."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = buf.data
    while True:
        n = c.syscall(_SYS_GETDENTS64, fd, ctypes.c_void_p(buf.addr), BUFFER_BYTES)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if n == 0:
            return None
        pos = 0
        while pos < n:
            ino, _, reclen = struct.unpack_from("<QqH", data, pos)
            name = ctypes.c_void_p(buf.addr + pos + 19)
            dots = data[pos + 19] == 46 and (data[pos + 20] == 0 or (data[pos + 20] == 46 and data[pos + 21] == 0))
            if not dots and ino != keep_ino and c.unlinkat(fd, name, 0) != 0:
                err = ctypes.get_errno()
                if err != errno.EISDIR:
                    raise OSError(err, os.strerror(err))
                if c.unlinkat(fd, name, _AT_REMOVEDIR) != 0:  # not empty (or not writable): empty it first
                    c.fchmodat(fd, name, 0o700, 0)
                    sub = c.openat(fd, name, _DIR_FLAGS)
                    if sub < 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                    return sub
            pos += reclen


def _drop_xattrs(fd, buf):
    c = libc()
    n = c.flistxattr(fd, ctypes.c_void_p(buf.addr), BUFFER_BYTES)
    if n < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise OSError(err, os.strerror(err))
    pos = 0
    while pos < n:
        end = buf.data.find(b"\0", pos, n)
        if c.fremovexattr(fd, ctypes.c_void_p(buf.addr + pos)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        pos = end + 1
