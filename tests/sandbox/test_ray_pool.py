"""Grading on Ray actors gives the verdicts a local grader gives, in order (a local Ray with two actors)."""

from __future__ import annotations

import pytest

from sandbox.executor import Executor, Limits
from sandbox.grader import GradeRequest, Grader
from sandbox.loaders import load_humaneval
from sandbox.problems import Problem, ProblemError, ProblemTest

ray = pytest.importorskip("ray")
LIMITS = Limits(wall_s=20, cpu_s=20, memory_mb=512)


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a Ray of this test's own, even when a cluster is already running on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def requests() -> list[GradeRequest]:
    problems = load_humaneval()[:6]
    items = []
    for p in problems:
        body = p.solution or ""
        items.append(GradeRequest(p, "```python\n%s\n```" % body))  # right
        items.append(GradeRequest(p, "```python\n    return None\n```"))  # wrong
    squares = Problem(id="sq", prompt="", tests=[ProblemTest(kind="stdin", input="%d\n" % n, output=str(n * n))
                                                 for n in range(1, 5)])
    items.append(GradeRequest(squares, "```python\nn = int(input())\nprint(n * n)\n```"))
    items.append(GradeRequest(squares, "```python\nn = int(input())\nprint(n + n)\n```"))
    items.append(GradeRequest(squares, "no code here"))
    return items


def timeless(verdict) -> dict:
    """A verdict without its wall-clock times (the one thing that differs between two gradings)."""
    d = verdict.model_dump()
    for t in d["tests"]:
        t.pop("wall_s")
    return d


def test_a_ray_pool_grades_like_a_local_grader(local_ray):
    from sandbox.ray_pool import RayGraderPool

    items = requests()
    with Executor(2, limits=LIMITS) as ex:
        local = Grader(ex, time_limit_s=5).grade_many(items)
    with RayGraderPool(2, workers_per_actor=1, limits=LIMITS, time_limit_s=5) as pool:
        assert len(pool.layers) == 2 and all(all(layers.values()) for layers in pool.layers)
        remote = pool.grade_many(items)
        with pytest.raises(ProblemError):
            pool.grade_many([GradeRequest(Problem(id="empty", prompt="", tests=[]), "x")])
    assert [v.verdict for v in remote] == [v.verdict for v in local]
    assert [timeless(v) for v in remote] == [timeless(v) for v in local]
    verdicts = [v.verdict for v in remote]
    assert verdicts[:12:2] == ["accepted"] * 6 and "accepted" not in verdicts[1:12:2]
    assert verdicts[12:] == ["accepted", "wrong_answer", "format_error"]
