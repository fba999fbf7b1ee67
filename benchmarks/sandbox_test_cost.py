"""What one check test costs in the sandbox, process by process, against the floor of a fresh process per test.

One worker with every isolation layer on, one session of a one-line function, ``--tests`` tests one after
another, each a fresh process (``Session.call``: a call with its own limit), then as many calls within one test
(``Session.shared_limit``: one process). CPU time per test from the processes' own counters, read outside the
sandbox from /proc before and after:

- the test's processes C (forked by the session's process B, reaped by it: B's children's time);
- the session's process B (it forks each C, relays what C writes, ends what C left and empties the scratch dir);
- the fork server (the worker's process that reads B's pipes and bills each call its CPU time);
- this trusted process (the executor's requests and replies, decoding the returned value).

The floor: a process the size of B (the interpreter and the fork server's preloaded modules, no isolation) that
forks a child running the same function and reaps it, ``--tests`` times: the fork's page tables, both sides'
copy-on-write faults and the child's exit, nothing else.

    .venv/bin/python benchmarks/sandbox_test_cost.py --tests 2000
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.executor import Executor, Limits  # noqa: E402
from sandbox_throughput import Forker  # noqa: E402

PROGRAM = "from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    return sum(xs)\n"
_TICKS = os.sysconf("SC_CLK_TCK")

def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def _stat(pid: int) -> tuple[float, float, int]:
    """(own CPU seconds, waited-for children's CPU seconds, start time in ticks) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ((int(fields[11]) + int(fields[12])) / _TICKS, (int(fields[13]) + int(fields[14])) / _TICKS,
            int(fields[19]))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def sandbox_processes() -> tuple[int, int]:
    """(fork server, session process B) below this process: the fork server is the first Python below
    bubblewrap; B its youngest child (its oldest is the template)."""
    todo, server = _children(os.getpid()), None
    while todo and server is None:
        pid = todo.pop(0)
        if _comm(pid).startswith("python"):
            server = pid
        else:
            todo.extend(_children(pid))
    if server is None:
        raise SystemExit("no sandbox worker found below this process (is bubblewrap available?)")
    kids = sorted(_children(server), key=lambda p: _stat(p)[2])
    if len(kids) < 2:
        raise SystemExit("the fork server has no session process")
    return server, kids[-1]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(session, server: int, b: int, n: int, shared: bool) -> dict:
    s0, b0, t0, w0 = _stat(server), _stat(b), _cpu(), time.perf_counter()
    if shared:
        with session.shared_limit(timeout_s=60) as test:
            for _ in range(n):
                test.call("f", [[1, 2, 3]])
    else:
        for _ in range(n):
            out = session.call("f", [[1, 2, 3]], timeout_s=5)
            if out.status != "ok":
                raise SystemExit(f"a call ended {out.status}: {out.error}")
    w1, t1, b1, s1 = time.perf_counter(), _cpu(), _stat(b), _stat(server)
    ms = 1000 / n
    return {"wall": (w1 - w0) * ms, "C": (b1[1] - b0[1]) * ms, "B": (b1[0] - b0[0]) * ms,
            "server": (s1[0] - s0[0]) * ms, "trusted": (t1 - t0) * ms}


def floor(n: int) -> dict:
    forker = Forker(PROGRAM + "\nf([1, 2, 3])\n")  # each child defines the function and calls it
    try:
        wall, parent, child = forker.fork(n)
    finally:
        forker.close()
    return {"wall": wall * 1000 / n, "C": child * 1000 / n, "B": parent * 1000 / n, "server": 0.0, "trusted": 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=2000, help="tests (and calls within one test) per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="measurements; the table gives their medians")
    ap.add_argument("--disable", default="", metavar="LAYERS",
                    help="comma-separated isolation layers to turn off (what each costs), e.g. cgroup,seccomp")
    args = ap.parse_args(argv)

    rows: dict[str, list[dict]] = {"a fresh process per test (ours)": [], "calls within one test (ours)": [],
                                   "floor: fork, run, exit": []}
    disable = {x for x in args.disable.split(",") if x}
    with Executor(1, isolation="auto" if disable else "full", limits=Limits(wall_s=60, cpu_s=60),
                  disable=disable) as ex:
        print("layers:", ", ".join(k for k, v in ex.isolation_report().items() if v))
        with ex.session(PROGRAM) as session:
            for _ in range(50):  # warm-up: B exists and every path has run once
                session.call("f", [[1, 2, 3]], timeout_s=5)
            server, b = sandbox_processes()
            for i in range(args.repeat):
                rows["a fresh process per test (ours)"].append(measure(session, server, b, args.tests, False))
                rows["calls within one test (ours)"].append(measure(session, server, b, args.tests, True))
                rows["floor: fork, run, exit"].append(floor(args.tests))
                print(f"measurement {i + 1}/{args.repeat} done", flush=True)
    cols = ("wall", "C", "B", "server", "trusted")
    print(f"\nms per test (per call within one test), medians of {args.repeat} x {args.tests}; CPU time of the "
          "test's processes C, the session process B, the fork server and this trusted process")
    print("%-34s %7s %7s %7s %7s %8s %9s" % ("", "wall", "C", "B", "server", "trusted", "CPU sum"))
    med = {name: {c: statistics.median(r[c] for r in runs) for c in cols} for name, runs in rows.items()}
    for name, m in med.items():
        print("%-34s %7.2f %7.2f %7.2f %7.2f %8.2f %9.2f" % (name, *(m[c] for c in cols),
                                                             sum(m[c] for c in cols[1:])))
    ours, base = med["a fresh process per test (ours)"], med["floor: fork, run, exit"]
    print("\nours / floor: wall %.2fx, CPU %.2fx" % (
        ours["wall"] / base["wall"], sum(ours[c] for c in cols[1:]) / sum(base[c] for c in cols[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
