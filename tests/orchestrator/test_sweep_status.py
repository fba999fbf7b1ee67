"""What `opsd sweep status` and the live view say about a sweep folder, written here event by event as the
driver and the trainables write it: a killed or stopped driver, configuration errors, failures with their
reason, and the table at 80 columns."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from orchestrator.driver import DriverRecord
from orchestrator.sweep_file import load_sweep
from orchestrator.sweep_state import SweepState, prepare_sweep_dir, sweep_location
from orchestrator.sweep_status import estimated_remaining, status_table, sweep_status, trial_status

OPSD = [sys.executable, "-m", "orchestrator.cli"]
CONTEXTS = ["none", "peer_solution_feedback", "llm_peer_hints"]


def make_sweep(tmp_path: Path, *, max_failures: int = 2) -> SweepState:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: status\nstorage: {tmp_path / 'store'}\nmodels: [{{path: embedded:smollm2-135m-instruct, "
                    f"label: smollm2-135m}}]\ncontexts: {json.dumps(CONTEXTS)}\nseeds: [0]\n"
                    f"max_failures: {max_failures}\ntrial: {{steps: 4}}\n")
    sweep, points = load_sweep(path)
    return prepare_sweep_dir(sweep, points, sweep_location(sweep)[0], path)


def trial_ids(state: SweepState) -> list[str]:
    return list(state.trials)


def start_attempt(state: SweepState, trial_id: str, attempt: int, at: float, *, driver_run: str | None = None,
                  host: str | None = None, node_id: str = "n" * 56) -> None:
    files = state.trial_files(trial_id)
    files.append_attempt({"attempt": attempt, "event": "start", "time": at, "host": host or socket.gethostname(),
                          "node_id": node_id, "log": str(files.log(attempt)), "driver_run": driver_run})


def end_attempt(state: SweepState, trial_id: str, attempt: int, at: float, code: int | None, **extra) -> None:
    state.trial_files(trial_id).append_attempt({"attempt": attempt, "event": "end", "time": at, "exit_code": code,
                                                **extra})


def write_steps(path: Path, rows: list[dict]) -> None:
    """steps.parquet as the trial writes it: the union of the rows' columns, nulls where a row has none."""
    columns = sorted({k for row in rows for k in row})
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, created


def write_driver(state: SweepState, *, pid: int, create_time: float, started: float, updated: float,
                 host: str | None = None, ended: float | None = None, outcome: str | None = None) -> DriverRecord:
    record = DriverRecord(run_id="r1", host=host or socket.gethostname(), pid=pid, create_time=create_time,
                          started=started, updated=updated, ended=ended, outcome=outcome)
    record.write(state.dir)
    return record


def test_a_killed_driver_leaves_an_interrupted_trial_whose_clock_stops(tmp_path):
    state = make_sweep(tmp_path)
    trial = trial_ids(state)[0]
    t0 = time.time() - 600
    start_attempt(state, trial, 1, t0)
    pid, created = dead_pid()
    write_driver(state, pid=pid, create_time=created, started=t0 - 5, updated=t0 + 100)  # SIGKILLed: no end

    status = trial_status(state, trial)
    assert status.state == "interrupted"
    assert status.seconds == pytest.approx(100.0)  # up to the driver's last heartbeat, not to now
    later = trial_status(state, trial, now=time.time() + 3600)
    assert later.seconds == pytest.approx(100.0)
    assert "running when the driver stopped" in status.failure
    assert [s.state for s in sweep_status(state)] == ["interrupted", "pending", "pending"]

    out = subprocess.run([*OPSD, "sweep", "status", str(state.dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # rich wraps long lines
    assert "interrupted" in text and "driver not running: killed or lost" in text
    assert f"`opsd sweep resume {state.dir}` continues the sweep" in text
    assert "running" not in text.replace("was running", "").replace("not running", "")


def test_a_live_driver_keeps_its_trial_running(tmp_path):
    state = make_sweep(tmp_path)
    trial = trial_ids(state)[0]
    t0 = time.time() - 60
    start_attempt(state, trial, 1, t0)
    me = psutil.Process()
    write_driver(state, pid=me.pid, create_time=me.create_time(), started=t0, updated=t0)
    status = trial_status(state, trial, now=t0 + 50)
    assert status.state == "running" and status.seconds == pytest.approx(50.0)
    # The same record seen from another machine: alive while its heartbeat is fresh, gone once it is stale.
    write_driver(state, pid=1, create_time=0.0, started=t0, updated=t0, host="elsewhere")
    assert trial_status(state, trial, now=t0 + 60).state == "running"
    assert trial_status(state, trial, now=t0 + 600).state == "interrupted"


def test_an_attempt_the_driver_stopped_is_interrupted_then_pending_when_the_next_driver_runs(tmp_path):
    state = make_sweep(tmp_path, max_failures=0)
    trial = trial_ids(state)[0]
    t0 = time.time() - 100
    start_attempt(state, trial, 1, t0)
    end_attempt(state, trial, 1, t0 + 40, None, interrupted=True, reason="the sweep's driver stopped")
    pid, created = dead_pid()
    write_driver(state, pid=pid, create_time=created, started=t0, updated=t0 + 41, ended=t0 + 41,
                 outcome="interrupted")
    status = trial_status(state, trial)
    # Not a failure: max_failures 0 would otherwise make it "failed".
    assert status.state == "interrupted" and status.seconds == pytest.approx(40.0)
    me = psutil.Process()
    write_driver(state, pid=me.pid, create_time=me.create_time(), started=time.time(), updated=time.time())
    assert trial_status(state, trial).state == "pending"


def test_a_configuration_error_fails_the_trial_at_once_with_its_reason(tmp_path):
    state = make_sweep(tmp_path, max_failures=3)
    config_error, crash = trial_ids(state)[:2]
    t0 = time.time() - 100
    reason = "ModelError: model.path: 'models/smollm2-local' is not a local folder and could not be fetched"
    start_attempt(state, config_error, 1, t0)
    end_attempt(state, config_error, 1, t0 + 5, 2, reason=reason)
    start_attempt(state, crash, 1, t0)
    end_attempt(state, crash, 1, t0 + 5, -9, reason="killed by SIGKILL")
    statuses = {s.trial_id: s for s in sweep_status(state)}
    assert statuses[config_error].state == "failed" and statuses[config_error].attempts == 1
    assert statuses[config_error].failure.startswith("attempt 1 exit 2 (a configuration error: not retried): "
                                                     + reason)
    assert statuses[crash].state == "retrying"
    assert statuses[crash].failure.startswith("attempt 1 killed by signal 9: killed by SIGKILL (log ")
    out = subprocess.run([*OPSD, "sweep", "status", str(state.dir)], capture_output=True, text=True, timeout=120)
    assert reason in " ".join(out.stdout.split())


def test_remaining_time_is_estimated_before_any_trial_completes(tmp_path):
    """One train step of one running trial is enough: its projected length prices the waiting trials."""
    state = make_sweep(tmp_path)
    running = trial_ids(state)[0]
    t0 = time.time() - 100
    start_attempt(state, running, 1, t0)
    me = psutil.Process()
    write_driver(state, pid=me.pid, create_time=me.create_time(), started=t0, updated=t0)
    files = state.trial_files(running)
    files.progress.write_text(json.dumps({"status": "running", "step": 2, "steps": 4, "phase": "student_forward_backward",
                                          "started": t0}))
    write_steps(files.steps, [{"step": 1, "phase": "train", "time/rollout_s": 20.0,
                               "time/student_forward_backward_s": 10.0, "loss": 0.5}])
    statuses = sweep_status(state, now=t0 + 100)
    assert statuses[0].remaining_s == pytest.approx(3 * 30.0)  # steps 2, 3 and 4 at the step's 30 s
    # Running: 90 s left; two waiting trials of 100 + 90 s each, one at a time after it.
    assert estimated_remaining(statuses, concurrency=1) == pytest.approx(90 + 2 * 190)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(status_table(state, statuses, elapsed=100, concurrency=1, width=200))
    text = console.export_text()
    assert "remaining ~0:07:50" in text and "~-" not in text
    assert "student f+b" in text  # the long phase name, shortened


def filled_sweep(tmp_path: Path) -> list:
    """Three trials, one in every interesting state, with long ids and every metric set."""
    state = make_sweep(tmp_path)
    t0 = time.time() - 3000
    me = psutil.Process()
    write_driver(state, pid=me.pid, create_time=me.create_time(), started=t0, updated=time.time())
    for k, trial in enumerate(trial_ids(state)):
        start_attempt(state, trial, 1, t0, host="gpu-node-a", node_id=f"{k % 2}abcdef" + "0" * 49)
        files = state.trial_files(trial)
        files.progress.write_text(json.dumps({"status": "running", "step": 3, "steps": 4, "started": t0,
                                              "phase": "student_forward_backward"}))
        write_steps(files.steps, [
            {"step": 0, "phase": "eval", "student_acc": 0.125, "teacher_acc": 0.25, "gap": 0.125},
            {"step": 1, "phase": "train", "time/rollout_s": 20.0, "loss": 0.5123, "kl": 0.0456},
            {"step": 2, "phase": "train", "time/rollout_s": 20.0, "loss": 0.4123, "kl": 0.0356}])
    return sweep_status(state), state


def render(state, statuses, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(status_table(state, statuses, elapsed=3000, concurrency=3, width=width))
    return console.export_text().splitlines()


def columns_of(lines: list[str]) -> list[str]:
    header = next(line for line in lines if "trial" in line and "state" in line)
    return [c.strip() for c in header.strip("┃ ").split("┃")]


def test_the_table_reads_at_80_columns(tmp_path):
    statuses, state = filled_sweep(tmp_path)
    lines = render(state, statuses, 80)
    assert max(len(line) for line in lines) <= 80
    # The most useful columns stay whole; the rest is left out rather than every column cut to a character.
    assert columns_of(lines) == ["trial", "state", "step", "left", "gap"]
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == [s.trial_id for s in statuses]
    assert all("running" in row and "3/4" in row and "0:00:40" in row and "+0.125" in row for row in rows)


def test_the_wide_table_has_every_column_and_tells_nodes_on_one_host_apart(tmp_path):
    statuses, state = filled_sweep(tmp_path)
    lines = render(state, statuses, 200)
    assert columns_of(lines) == [
        "trial", "state", "step", "phase", "time", "left", "loss", "kl", "student", "teacher", "gap", "node"]
    body = "\n".join(lines)
    assert "gpu-node-a:0abcde" in body and "gpu-node-a:1abcde" in body
    assert "0.4123" in body and "+0.125" in body and "student f+b" in body
