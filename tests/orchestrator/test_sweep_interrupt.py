"""A real sweep (Ray Tune, real trials of a tiny model) stopped as users stop one, and a trial with a
configuration error: what the terminal says, the exit code, and what `opsd sweep status` reports after.

1. Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) while trials run: the driver exits
   130 saying "interrupted" and the resume command; no attempt is left open, no trial is called running, and
   no process of a trial is left.
2. The same sweep continued, then its driver SIGKILLed with its Ray: `status` calls the cut attempt
   interrupted, says the driver is not running with the resume command, and the trial's clock stops.
3. A model that is neither a folder nor in the hub cache: each trial fails once with the configuration error
   code and is not retried; status gives the reason.

Slow (minutes): `bash scripts/test.sh -m slow tests/orchestrator/test_sweep_interrupt.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.test_sweep_run import attempts, marked_processes, still_alive, trial_env
from tests.trainer.copy_task import copy_problems, write_problems

pytestmark = pytest.mark.slow

OPSD = [sys.executable, "-m", "orchestrator.cli"]
# Unique to this test run, so that another run's trials (same machine) are not taken for this one's.
SWEEP = f"stops-{os.getpid()}"


def write_sweep(root: Path, model: str, *, name: str) -> Path:
    data = write_problems(root / "problems.jsonl", copy_problems(8))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "storage": str(root / "storage"),
        "models": [{"path": model, "label": "tiny", "family": "tiny", "size_b": 0.001}],
        "contexts": ["none", "llm_peer_hints"], "seeds": [0], "data": {"source": "jsonl", "path": str(data)},
        "resources": {"gpus": 0, "cpus": 1, "sandbox_workers": 1}, "max_failures": 2,
        "wandb": {"mode": "offline", "project": "opsd-test"},
        "trial": {"steps": 3, "context": {"max_teacher_prompt_tokens": 1024},
                  "rollout": {"prompts_per_step": 4, "n_samples": 2, "max_response_tokens": 16,
                              "max_prompt_tokens": 512},
                  "optim": {"lr": 1.0e-3, "mini_batch_size": 4, "micro_batch_size": 4},
                  "teacher": {"ema_rate": 0.0}, "eval": {"every_steps": 3, "n_samples": 1, "teacher_n_samples": 1}},
    }))
    return path


def status(sweep_dir: Path) -> tuple[list[dict], str]:
    rows = subprocess.run([*OPSD, "sweep", "status", str(sweep_dir), "--json"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    text = subprocess.run([*OPSD, "sweep", "status", str(sweep_dir)], capture_output=True, text=True, timeout=120,
                          check=True).stdout
    return [json.loads(line) for line in rows.splitlines()], " ".join(text.split())


def wait_for_running_attempts(driver: subprocess.Popen, trials: Path, n: int, log: Path, after: int = 0) -> None:
    """Until `n` trials have an attempt numbered above `after` whose trial process runs its steps."""
    deadline = time.monotonic() + 600
    while True:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        started = [d for d in (trials.iterdir() if trials.is_dir() else [])
                   if any(e["event"] == "pid" and e["attempt"] > after for e in attempts(d))]
        if len(started) >= n and all((d / "progress.json").is_file() for d in started):
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stopped_sweep(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("interrupt")
    path = write_sweep(root, str(tiny_model_dir), name=SWEEP)
    sweep_dir = root / "storage" / SWEEP
    out: dict = {"root": root, "dir": sweep_dir, "seen": {}}

    drivers: list[subprocess.Popen] = []
    try:
        # 1. Ctrl-C while both trials run.
        with open(root / "run.log", "w") as log:
            driver = subprocess.Popen([*OPSD, "sweep", "run", str(path), "--num-cpus", "2"], stdout=log,
                                      stderr=subprocess.STDOUT, env=trial_env(), start_new_session=True)
        drivers.append(driver)
        wait_for_running_attempts(driver, sweep_dir / "trials", 2, root / "run.log")
        out["seen"].update(marked_processes(SWEEP))
        os.killpg(driver.pid, signal.SIGINT)
        out["ctrl_c_code"] = driver.wait(timeout=600)
        time.sleep(2)
        out["after_ctrl_c"] = status(sweep_dir)
        out["alive_after_ctrl_c"] = still_alive(out["seen"]) + list(marked_processes(SWEEP))
        out["attempts_after_ctrl_c"] = {d.name: attempts(d) for d in (sweep_dir / "trials").iterdir()}
        out["driver_after_ctrl_c"] = json.loads((sweep_dir / "driver.json").read_text())

        # 2. Continued, then the driver and its Ray SIGKILLed while a trial runs.
        with open(root / "rerun.log", "w") as log:
            driver = subprocess.Popen([*OPSD, "sweep", "run", str(path), "--num-cpus", "2"], stdout=log,
                                      stderr=subprocess.STDOUT, env=trial_env(), start_new_session=True)
        drivers.append(driver)
        wait_for_running_attempts(driver, sweep_dir / "trials", 1, root / "rerun.log", after=1)
        out["seen"].update(marked_processes(SWEEP))
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        first = status(sweep_dir)
        time.sleep(3)
        out["after_kill"], out["after_kill_later"] = first, status(sweep_dir)
        deadline = time.monotonic() + 60  # the trials' guards take their processes down with them
        while (still_alive(out["seen"]) or marked_processes(SWEEP)) and time.monotonic() < deadline:
            time.sleep(0.5)
        out["alive_after_kill"] = still_alive(out["seen"]) + list(marked_processes(SWEEP))
    finally:
        for driver in drivers:  # a failed wait leaves no sweep running behind the tests
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    return out


def test_ctrl_c_exits_130_and_says_how_to_continue(stopped_sweep):
    log = (stopped_sweep["root"] / "run.log").read_text()
    assert stopped_sweep["ctrl_c_code"] == 130, log[-3000:]
    assert "interrupted: 2 trial(s) unfinished" in " ".join(log.split())
    assert f"`opsd sweep resume {stopped_sweep['dir']}` continues the sweep" in " ".join(log.split())


def test_after_ctrl_c_no_attempt_is_open_and_no_trial_runs(stopped_sweep):
    for trial, events in stopped_sweep["attempts_after_ctrl_c"].items():
        starts = {e["attempt"] for e in events if e["event"] == "start"}
        ends = {e["attempt"] for e in events if e["event"] == "end"}
        assert starts == ends == {1}, (trial, events)
    rows, text = stopped_sweep["after_ctrl_c"]
    assert sorted(r["state"] for r in rows) == ["interrupted", "interrupted"], stopped_sweep["attempts_after_ctrl_c"]
    assert "driver not running: ended (interrupted)" in text
    assert stopped_sweep["alive_after_ctrl_c"] == []
    assert stopped_sweep["driver_after_ctrl_c"]["outcome"] == "interrupted"
    # The last table printed is the stopped sweep's, not the last frame of the live view.
    log = " ".join((stopped_sweep["root"] / "run.log").read_text().split())
    assert f"sweep {SWEEP}: 0/2 done, 2 interrupted" in log and "trials: 2 interrupted in" in log


def test_a_killed_driver_leaves_a_truthful_status(stopped_sweep):
    rows, text = stopped_sweep["after_kill"]
    later, _ = stopped_sweep["after_kill_later"]
    states = sorted(r["state"] for r in rows)
    assert "running" not in states and "interrupted" in states, rows
    assert "driver not running: killed or lost" in text
    assert f"`opsd sweep resume {stopped_sweep['dir']}` continues the sweep" in text
    # The clock of an interrupted trial stops where the driver was last seen.
    assert [r["seconds"] for r in later] == [r["seconds"] for r in rows]
    assert stopped_sweep["alive_after_kill"] == []


def test_a_configuration_error_fails_each_trial_once_with_its_reason(tmp_path):
    path = write_sweep(tmp_path, "nohub/no-such-model", name="badmodel")
    env = {**trial_env(), "HF_HUB_OFFLINE": "1"}  # the hub is unreachable here: say so at once
    with open(tmp_path / "run.log", "w") as log:
        result = subprocess.run([*OPSD, "sweep", "run", str(path), "--num-cpus", "2"], stdout=log,
                                stderr=subprocess.STDOUT, env=env, timeout=900)
    text = " ".join((tmp_path / "run.log").read_text().split())
    assert result.returncode == 1, text[-3000:]
    sweep_dir = tmp_path / "storage" / "badmodel"
    for trial_dir in (sweep_dir / "trials").iterdir():
        starts = [e for e in attempts(trial_dir) if e["event"] == "start"]
        (end,) = [e for e in attempts(trial_dir) if e["event"] == "end"]
        assert len(starts) == 1 and end["exit_code"] == 2, attempts(trial_dir)
        assert "model.path: 'nohub/no-such-model'" in end["reason"]
    rows, status_text = status(sweep_dir)
    assert [r["state"] for r in rows] == ["failed", "failed"] and all(r["attempts"] == 1 for r in rows)
    assert "exit 2 (a configuration error: not retried): ModelError: model.path: 'nohub/no-such-model'" in status_text
    assert "2 trial(s) failed" in text
    assert len(list((sweep_dir / "wandb").glob("offline-run-*"))) == 2  # one per trial, not one per retry
