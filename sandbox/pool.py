"""Long-lived sandbox workers (one bubblewrap + fork server each) and the pool that lends them out."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from sandbox import isolation
from sandbox.wire import FrameReader, pack_frame, write_all

_SANDBOX_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 30.0


class WorkerDied(RuntimeError):
    """The worker process ended or stopped answering; it has been killed and must be restarted."""


# The modules that run inside the sandbox (standard library only), in import order.
SANDBOX_MODULES = ("codec", "wire", "confine", "program", "calls", "template", "runner")
_BOOT = """
import sys, types
package = types.ModuleType("sandbox")
package.__path__ = []
sys.modules["sandbox"] = package
for name, source in %r:
    module = types.ModuleType("sandbox." + name)
    module.__file__ = "<sandbox/%%s.py>" %% name
    sys.modules[module.__name__] = module
    setattr(package, name, module)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
del package, module, name, source
sys.modules["sandbox.runner"].serve()
"""


def worker_source() -> str:
    """The fork server's program: the sandbox's own modules, loaded as the package ``sandbox`` (their imports
    of each other work as on the trusted side), then ``runner.serve``."""
    return _BOOT % ([(name, (_SANDBOX_DIR / (name + ".py")).read_text()) for name in SANDBOX_MODULES],)


class Worker:
    """One sandbox process. Not thread-safe: the pool hands it to one session at a time."""

    def __init__(self, plan: isolation.Plan, probe_limits: dict, tmpfs_bytes: int, cpu: int | None = None):
        """``cpu``: the CPU this worker's processes run on (None: wherever the scheduler puts them)."""
        self.plan, self.probe_limits, self.tmpfs_bytes, self.cpu = plan, probe_limits, tmpfs_bytes, cpu
        self.proc: subprocess.Popen | None = None
        self.layers: dict[str, bool] = {}
        self.scratch_root: str | None = None
        self.cgroup: isolation.WorkerCgroup | None = None
        self._limits_key: tuple | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, spawner) -> None:
        """Launch the process in ``spawner`` (a long-lived thread: bubblewrap's --die-with-parent fires
        when the THREAD that started it exits), then wait for the fork server's self-test here."""
        spawner.submit(self._launch).result()
        self._handshake()

    def _launch(self) -> None:
        plan, source = self.plan, worker_source()
        if plan.bwrap:
            cmd = isolation.bwrap_command(plan.bwrap, plan.python, source, tmpfs_bytes=self.tmpfs_bytes)
            scratch_root = "/tmp"
        else:
            cmd = isolation.direct_command(plan.python, source)
            self.scratch_root = scratch_root = tempfile.mkdtemp(prefix="opsd-sandbox-")
            os.chmod(scratch_root, 0o711)
        kwargs = {}
        if plan.as_nobody:
            kwargs = dict(user=isolation.NOBODY, group=isolation.NOBODY, extra_groups=[])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(isolation.SANDBOX_ENV), cwd="/", start_new_session=True, close_fds=True, **kwargs,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._reader = FrameReader()
        cfg = {
            # mounts: a program gets its own mount namespace, /proc and a size-capped tmpfs on /tmp (inside
            # bubblewrap, or as root without it: host_root, the host's mounts copied, made private).
            "pidns": plan.pidns, "mounts": plan.pidns and (bool(plan.bwrap) or plan.drop == "setuid"),
            "host_root": not plan.bwrap, "drop": plan.drop,
            "env": isolation.SANDBOX_ENV, "scratch_root": scratch_root, "probe_limits": self.probe_limits,
            "wipe_scratch_root": bool(plan.bwrap),
        }
        self._init = ({"cfg": cfg}, [plan.bpf or b""])

    def _handshake(self) -> None:
        try:
            header, _ = self.request(*self._init, timeout_s=READY_TIMEOUT_S)
        except WorkerDied as e:
            raise WorkerDied("the sandbox worker did not start: %s" % e) from None
        layers = header.get("layers")
        if not header.get("ready") or type(layers) is not dict or "error" in layers:
            self.kill()
            raise WorkerDied("the sandbox worker failed its self-test: %s" % (layers,))
        self.layers = {k: v is True for k, v in layers.items()}
        if self.plan.cgroup:
            try:
                self.cgroup = isolation.WorkerCgroup("%x" % id(self))
                self.cgroup.add_tree(self.proc.pid)
                self._limits_key = None
            except OSError as e:
                self.kill()
                raise WorkerDied("could not put the worker in its cgroup: %s" % e) from None
        self.layers["cgroup"] = self.cgroup is not None
        tree = isolation._descendants(self.proc.pid)  # bubblewrap's processes and the fork server
        if self.cpu is not None:
            # Every program is a round trip between the fork server and the program's process (and its
            # children): on one CPU their wake-ups need no cross-CPU interrupt (+9% HumanEval programs/s here).
            for pid in [self.proc.pid] + tree:
                try:
                    os.sched_setaffinity(pid, {self.cpu})
                except OSError:
                    pass
        if os.geteuid() == 0:
            # The fork server must wake up on time even when a program's processes saturate the CPUs;
            # each program goes back to nice 0 before its code runs.
            for pid in tree:
                try:
                    os.setpriority(os.PRIO_PROCESS, pid, -10)
                except OSError:
                    pass

    def apply_limits(self, memory_mb: int, n_procs: int, file_bytes: int) -> None:
        """Cap the worker's cgroup for the next program: its memory plus the fork server and scratch tmpfs."""
        key = (memory_mb, n_procs, file_bytes)
        if self.cgroup is not None and key != self._limits_key:
            scratch = max(16 << 20, 4 * file_bytes)
            self.cgroup.set_limits((memory_mb << 20) + (64 << 20) + scratch, n_procs + 8)
            self._limits_key = key

    def request(self, header: dict, blobs: list[bytes], *, timeout_s: float) -> tuple[dict, list[bytes]]:
        """Send one frame and wait for the reply; kill the worker on EOF, garbage or timeout."""
        proc = self.proc
        try:
            write_all(proc.stdin.fileno(), pack_frame(header, blobs))  # unbuffered: one write system call
        except (BrokenPipeError, OSError, ValueError):
            self.kill()
            raise WorkerDied("the worker's input closed") from None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerDied("the worker did not answer within %.1f s" % timeout_s)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                why = self._stderr_tail()
                self.kill()
                raise WorkerDied("the worker exited" + (": " + why if why else ""))
            try:
                frames = self._reader.feed(chunk)
            except (ValueError, RecursionError) as e:
                self.kill()
                raise WorkerDied("garbled reply from the worker (%s)" % e) from None
            if frames:
                reply, out_blobs = frames[0]
                if type(reply) is not dict:
                    self.kill()
                    raise WorkerDied("garbled reply from the worker")
                return reply, out_blobs

    def _stderr_tail(self) -> str:
        try:
            self.proc.wait(timeout=1.0)
            return ("exit status %s; " % self.proc.returncode) + self.proc.stderr.read()[-2000:].decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - only a diagnostic
            return ""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (bubblewrap takes its namespaces down with it)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self.scratch_root:
            import shutil

            shutil.rmtree(self.scratch_root, ignore_errors=True)
            self.scratch_root = None


class Pool:
    """A fixed number of workers; ``acquire`` blocks until one is free and restarts dead ones."""

    def __init__(self, n_workers: int, make_worker):
        """``make_worker(i)`` makes the i-th worker."""
        self._make = make_worker
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._all: list[Worker] = []
        self._closed = False
        self._lock = threading.Lock()
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        workers = [make_worker(i) for i in range(n_workers)]
        try:
            self._start_all(workers)
        except BaseException:
            for w in workers:
                w.kill()
            self._spawner.shutdown(wait=True)
            raise
        for w in workers:
            self._all.append(w)
            self._idle.put(w)

    @property
    def layers(self) -> dict:
        """The isolation layers the first worker's self-test found (every worker runs the same set-up)."""
        return self._all[0].layers

    def _start_all(self, workers: list[Worker]) -> None:
        errors: list[BaseException] = []

        def start(w: Worker) -> None:
            try:
                w.start(self._spawner)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def acquire(self) -> Worker:
        if self._closed:
            raise RuntimeError("the executor is closed")
        worker = self._idle.get()
        if not worker.alive:
            try:
                worker.start(self._spawner)
            except BaseException:
                self._idle.put(worker)
                raise
        return worker

    def release(self, worker: Worker) -> None:
        self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._all:
                w.kill()
            self._spawner.shutdown(wait=True)
