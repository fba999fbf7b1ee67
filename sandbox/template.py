"""The template: a pristine copy of the fork server, forked from it before it reads any request, from which every
program's process is cloned (inside the sandbox, standard library only). It only ever receives, on a socket,
the descriptors of the next program's process and its limits, mode and scratch dir: so a program's process
holds nothing of the requests, inputs or outputs of any other program, nor of its own later tests. Clones
are made with CLONE_PARENT: each is a child of the fork server, which waits for it and reads its rusage and
CPU clock. This file runs inside the sandbox (see ``sandbox/pool.py:worker_source``).
"""

import json
import os
import signal
import socket

from sandbox.confine import PR_SET_PDEATHSIG, clone_for_parent, drop_inheritable_capabilities, libc
from sandbox.calls import serve_calls
from sandbox.program import become_program


def _template_loop(sock, cfg):
    """The template: per message on ``sock`` (a program's limits, mode and scratch dir, and its five
    descriptors), clone one program's process and answer its pid. It reads nothing else, ever."""
    c = libc()
    c.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if cfg["drop"] == "caps":
        drop_inheritable_capabilities(cfg["prepared"])
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # the fork server's channels to the trusted process: never the template's
        os.dup2(null, fd)
    os.close(null)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        header = json.loads(msg)
        try:
            pid = clone_for_parent(cfg["pidns"])
        except OSError as e:
            pid = -(e.errno or 1)
        if pid == 0:
            become_program(cfg, header, fds, serve_calls)
        for fd in fds:
            os.close(fd)
        del header, msg, fds
        sock.send(b"%d" % pid)


class TemplateGone(RuntimeError):
    """The template process has ended."""


class Template:
    """The fork server's handle on its template (forked from it before any request was read)."""

    def __init__(self, cfg):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            try:
                _template_loop(theirs, cfg)
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock = pid, mine

    def spawn(self, header, fds):
        """Clone a program's process with these descriptors; its pid (a child of the fork server). Raises
        TemplateGone when the template has died (e.g. the cgroup's OOM killer chose it): the fork server cannot
        make another (its memory is no longer pristine), so it ends and the pool replaces the worker."""
        try:
            socket.send_fds(self.sock, [json.dumps(header, separators=(",", ":")).encode()], fds)
            reply = self.sock.recv(64)
        except OSError as e:
            raise TemplateGone(str(e)) from None
        if not reply:
            raise TemplateGone("the template ended")
        pid = int(reply)
        if pid < 0:
            raise OSError(-pid, "clone: %s" % os.strerror(-pid))
        return pid
