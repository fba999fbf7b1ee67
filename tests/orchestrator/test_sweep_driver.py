"""How `opsd sweep run|resume` ends, with Ray Tune stood in for: what Tune does on Ctrl-C (it saves its state,
stops the trials and returns from fit() with trials unfinished) or on a second Ctrl-C (KeyboardInterrupt),
and what the driver then leaves in the sweep folder and says. The real thing, with Ray, is the slow
tests/orchestrator/test_sweep_interrupt.py."""

from __future__ import annotations

import json
import time

import pytest

import orchestrator.sweep_cli as sweep_cli
import orchestrator.tune_run as tune_run
from orchestrator.driver import read_driver
from orchestrator.sweep_status import sweep_status
from tests.orchestrator.test_sweep_status import make_sweep, start_attempt, trial_ids


def fake_run(completed: list[str], running: list[str], *, then: BaseException | None = None):
    """A run_sweep that completes some trials, leaves others mid-attempt (as a stop signal does), then returns
    or raises `then`."""
    def run_sweep(state, *, driver, console=None):
        for trial in completed + running:
            start_attempt(state, trial, 1, time.time() - 30, driver_run=driver.run_id)
        for trial in completed:
            files = state.trial_files(trial)
            files.summary_path.write_text(json.dumps({"status": "completed"}))
            files.append_attempt({"attempt": 1, "event": "end", "time": time.time(), "exit_code": 0})
        if then is not None:
            raise then
    return run_sweep


@pytest.mark.parametrize("how", ["ctrl-c", "second ctrl-c"])
def test_an_interrupted_sweep_exits_130_and_says_how_to_continue(tmp_path, monkeypatch, capsys, how):
    state = make_sweep(tmp_path)
    done, cut, never = trial_ids(state)
    monkeypatch.setattr(tune_run, "run_sweep",
                        fake_run([done], [cut], then=KeyboardInterrupt() if how == "second ctrl-c" else None))
    code = sweep_cli._drive(state)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 130
    assert f"interrupted: 2 trial(s) unfinished; `opsd sweep resume {state.dir}` continues the sweep" in err
    assert "trials: 1 completed, 1 interrupted, 1 pending" in err
    # The attempt the stop cut short ended, and says so; the driver's record says how it ended.
    (end,) = [e for e in state.trial_files(cut).events() if e["event"] == "end"]
    assert end["interrupted"] is True and end["exit_code"] is None
    driver = read_driver(state.dir)
    assert driver.outcome == "interrupted" and driver.ended is not None
    assert {s.trial_id: s.state for s in sweep_status(state)} == {done: "completed", cut: "interrupted",
                                                                   never: "pending"}


def test_a_finished_sweep_exits_0_and_one_with_a_failure_exits_1(tmp_path, monkeypatch, capsys):
    state = make_sweep(tmp_path, max_failures=0)
    ids = trial_ids(state)
    monkeypatch.setattr(tune_run, "run_sweep", fake_run(ids, []))
    assert sweep_cli._drive(state) == 0
    assert read_driver(state.dir).outcome == "finished"
    assert "interrupted" not in capsys.readouterr().err

    (tmp_path / "second").mkdir()
    state = make_sweep(tmp_path / "second", max_failures=0)
    ids = trial_ids(state)

    def one_fails(state, *, driver, console=None):
        fake_run(ids[:2], [])(state, driver=driver)
        start_attempt(state, ids[2], 1, time.time(), driver_run=driver.run_id)
        state.trial_files(ids[2]).append_attempt({"attempt": 1, "event": "end", "time": time.time(), "exit_code": 1,
                                                  "reason": "RuntimeError: boom"})
    monkeypatch.setattr(tune_run, "run_sweep", one_fails)
    assert sweep_cli._drive(state) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{ids[2]}: attempt 1 exit 1: RuntimeError: boom" in err and "1 trial(s) failed" in err


def test_without_an_address_the_sweep_starts_a_ray_of_its_own(tmp_path, monkeypatch):
    """An address-less ray.init joins the cluster `ray start` left its address for in /tmp/ray, even a
    stopped one (the driver then waits for its GCS and fails): the sweep asks for a local Ray of its own."""
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    tune_run.init_ray(tmp_path, None, num_cpus=2)
    tune_run.init_ray(tmp_path, "10.0.0.1:6379")
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2
    assert calls[1]["address"] == "10.0.0.1:6379"
