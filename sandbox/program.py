"""The program's own process (B, inside the sandbox, standard library only), from its clone off the template
(``become_program``): it confines itself (``sandbox/confine.py``), reads its program's code from its request
channel (fd 3), then either runs it once as __main__ (``program_run``, stdin on fd 0) or serves calls of its
functions, one request at a time, each in a fresh child that runs the top-level code and that call
(``sandbox/calls.py``, ``run_call``). Its reports go to fd 4, its output to fds 1 and 2: all of it is read by
the fork server as untrusted. This file runs inside the sandbox (see
``sandbox/pool.py:worker_source``).
"""

import os
import sys

from sandbox.codec import PlainDataError, decode_value, encode_value
from sandbox.confine import CLONE_NEWIPC, CLONE_NEWNS, check_syscall, enter_program, libc, limit_file_size
from sandbox.wire import pack_frame, read_frame, write_all

SOLUTION_FILE = "<solution>"
SETUP_FAILED = 97


def read_code():
    """The program's source: the first frame on the request channel."""
    request = read_frame(3)
    if request is None:
        os._exit(0)
    code = request[0].get("code")
    if type(code) is not str:
        os._exit(1)
    return code


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def format_error(exc):
    """Exception type + message + at most 3 traceback frames from the solution's own code."""
    import collections
    import traceback

    frames = collections.deque(maxlen=3)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == SOLUTION_FILE:
            frames.append((tb.tb_frame.f_code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    lines = []
    if frames:
        import linecache

        lines.append("Traceback (most recent call last):\n")
        for name, lineno in frames:
            lines.append('  File "%s", line %d, in %s\n' % (SOLUTION_FILE, lineno, name))
            src = linecache.getline(SOLUTION_FILE, lineno).strip()
            if src:
                lines.append("    %s\n" % src)
    try:
        lines.extend(traceback.format_exception_only(type(exc), exc))
    except BaseException:
        lines.append("%s: <message could not be printed>\n" % type(exc).__name__)
    return "".join(lines)[:4000]


def compile_program(code):
    import linecache

    linecache.cache[SOLUTION_FILE] = (len(code), None, code.splitlines(True), SOLUTION_FILE)
    return compile(code, SOLUTION_FILE, "exec")


def _new_main():
    import types

    module = types.ModuleType("__main__")
    module.__file__ = SOLUTION_FILE
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    return module


_MEMORY_FRAME = pack_frame({"status": "memory_limit", "error": "MemoryError"})


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if type(code) is int:
        return code & 0xFF
    try:
        sys.stderr.write("%s\n" % (code,))
    except BaseException:
        pass
    return 1


def program_run(code):
    """B, stdin mode: run the program once as __main__; report an uncaught exception on fd 4."""
    outcome, exit_code = None, 0
    try:
        exec(compile_program(code), _new_main().__dict__)
    except MemoryError:
        outcome = _MEMORY_FRAME
        exit_code = 1
    except SystemExit as e:
        exit_code = _exit_code(e)
    except BaseException as e:
        outcome = pack_frame({"status": "runtime_error", "error": format_error(e)})
        exit_code = 1
    _flush_std()
    if outcome is not None:
        try:
            write_all(4, outcome)
        except OSError:
            pass
    os._exit(exit_code)


def _resolve(module, target):
    names = target.split(".")
    if len(names) == 1:
        return module.__dict__[names[0]]
    if len(names) == 2:
        return getattr(module.__dict__[names[0]](), names[1])
    raise ValueError("bad call target %r" % target)


def run_call(compiled, header, more=False):
    """C, a call's own process (``sandbox/calls.py``): the top-level code in a fresh module (and the threads it
    starts that are not daemons, as at a program's exit), then the call ``header`` names; its answer goes to fd 4.
    With ``more`` (the calls of one test, which share its time limit), each next call of the test is read from
    fd 3 and made in the same module, until fd 3 is closed; else the process ends after its answer. An exception
    raised by a call is its runtime_error; one in the top-level code, an exit or a MemoryError also ends the
    session ("fatal")."""
    module = None  # once the top-level code has run
    while True:
        try:
            if module is None:
                loading = _new_main()
                exec(compiled, loading.__dict__)
                _join_threads()
                module = loading
            fn = _resolve(module, header["target"])
            args = decode_value(header["args"])
            value = fn(*args)
            try:
                response = {"status": "ok", "value": encode_value(value)}
            except PlainDataError as e:
                response = {"status": "runtime_error", "error": str(e)}
            except RecursionError:
                response = {"status": "runtime_error", "error": "returned a value nested too deeply"}
        except MemoryError:
            _flush_std()
            write_all(4, _MEMORY_FRAME)
            os._exit(1)
        except SystemExit as e:
            _flush_std()
            error = "the program exited (code %s) during the call" % (_exit_code(e),)
            write_all(4, pack_frame({"status": "runtime_error", "fatal": True, "error": error}))
            os._exit(1)
        except BaseException as e:
            response = {"status": "runtime_error", "error": format_error(e), "fatal": module is None}
        _flush_std()
        write_all(4, pack_frame(response))
        if not more or response.get("fatal"):
            os._exit(0)
        request = read_frame(3)
        if request is None:
            os._exit(0)
        header = request[0]


def _join_threads():
    threading = sys.modules.get("threading")
    if threading is None:
        return
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()


def become_program(cfg, header, fds, serve_calls):
    """In a fresh clone of the template: confine this process (B), then read the program and run it. Never
    returns. ``fds``: stdin, stdout, stderr, request channel, response channel (they become fds 0 to 4);
    ``serve_calls``: the call session's loop (``sandbox/calls.py``, which imports this module: passed in by the
    template, not imported here)."""
    limits = header["limits"]
    try:
        if cfg["pidns"]:
            # SysV IPC objects would outlive the program in the worker's IPC namespace: the seccomp filter
            # denies creating them; without it, the program gets its own IPC namespace.
            flags = (0 if cfg["bpf"] else CLONE_NEWIPC) | (CLONE_NEWNS if cfg["mounts"] else 0)
            if flags:
                check_syscall(libc().unshare(flags), "unshare")
        enter_program(cfg, limits, fds, header["scratch"])
        limit_file_size(limits["file_bytes"])
    except BaseException as e:
        msg = pack_frame({"setup_error": "%s: %s" % (type(e).__name__, e)})
        for fd in (fds[4], 4):  # 4 once enter_program has moved the descriptors
            try:
                os.write(fd, msg)
                break
            except OSError:
                continue
        os._exit(SETUP_FAILED)
    try:
        code = read_code()
        if header["mode"] == "run":
            program_run(code)
        else:
            serve_calls(code, cfg, header["scratch"])
    except BaseException:  # e.g. the program closed its request channel: never back into the template's code
        os._exit(1)
    os._exit(0)
