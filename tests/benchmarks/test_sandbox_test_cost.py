"""The per-test cost benchmark finds the sandbox's processes and bills each its own CPU time."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import sandbox_test_cost as bench  # noqa: E402

from sandbox.executor import Executor, Limits  # noqa: E402


def test_each_fresh_test_process_is_billed_to_the_session_process_that_reaped_it():
    with Executor(1, isolation="auto", limits=Limits(wall_s=60, cpu_s=60)) as ex:
        with ex.session(bench.PROGRAM) as session:
            session.call("f", [[1]], timeout_s=5)
            server, b = bench.sandbox_processes()
            assert server != b and b in bench._children(server)
            fresh = bench.measure(session, server, b, 150, shared=False)
            within = bench.measure(session, server, b, 150, shared=True)
    # 150 fresh processes, each reaped by B, are B's children's CPU time; 150 calls made in one process a small
    # part of it.
    assert fresh["C"] > 0.2 and within["C"] < fresh["C"] / 4, (fresh, within)
    assert fresh["wall"] > fresh["trusted"] > 0


def test_the_floor_forks_and_runs_the_function():
    floor = bench.floor(50)
    assert floor["wall"] > 0 and floor["C"] + floor["B"] > 0
