"""The trainable's own decisions, without Ray running: why an attempt ended, in one line, and no retry of an
attempt that ended on a configuration error within the same driver run."""

from __future__ import annotations

import json
import signal
import time

import pytest

from orchestrator.driver import DriverRecord
from orchestrator.errors import TrialFailed
from orchestrator.trainable import attempt_reason, train_grid_point
from tests.orchestrator.test_sweep_status import end_attempt, make_sweep, start_attempt, trial_ids


def test_the_reason_is_the_trials_own_error_when_this_attempt_wrote_it(tmp_path):
    log = tmp_path / "attempt-2.log"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: from the log\n")
    progress = {"status": "failed", "error": "ModelError: model.path: 'x/y' could not be fetched", "updated": 200.0}
    assert attempt_reason(2, progress=progress, log=log, started=100.0) == progress["error"]
    # progress.json of an earlier attempt says nothing about this one: the log's last error line does.
    assert attempt_reason(1, progress=progress, log=log, started=300.0) == "RuntimeError: from the log"


def test_the_reason_is_the_line_opsd_printed_before_a_traceback_line(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("INFO starting\nValueError: an earlier, handled one\n"
                   "opsd trial: error: context.hints_path: /x.jsonl: no such file\n")
    assert attempt_reason(2, progress={}, log=log, started=0.0) == "context.hints_path: /x.jsonl: no such file"


def test_the_reason_of_a_killed_attempt_is_its_signal(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("step 1/2  loss 0.5\n")
    assert attempt_reason(-signal.SIGKILL, progress={}, log=log, started=0.0).startswith(
        "killed by SIGKILL (the kernel's OOM killer")
    assert attempt_reason(-signal.SIGTERM, progress={}, log=tmp_path / "missing.log", started=0.0) == "killed by SIGTERM"
    assert attempt_reason(1, progress={}, log=log, started=0.0) is None


def test_a_configuration_error_is_not_retried_within_the_driver_run_that_saw_it(tmp_path):
    state = make_sweep(tmp_path, max_failures=3)
    trial = trial_ids(state)[0]
    driver = DriverRecord.start(state.dir)
    start_attempt(state, trial, 1, time.time() - 10, driver_run=driver.run_id)
    end_attempt(state, trial, 1, time.time(), 2, reason="ModelError: model.path: 'models/x' could not be fetched")
    events_before = state.trial_files(trial).events()
    with pytest.raises(TrialFailed, match="attempt 1 stopped on a configuration error, which a retry would repeat: "
                                          "ModelError: model.path: 'models/x'"):
        train_grid_point({"sweep_dir": str(state.dir), "sweep_uri": None, "trial_id": trial})
    assert state.trial_files(trial).events() == events_before  # no attempt started, no W&B run
    assert not (state.wandb_dir).exists()
    assert json.loads((state.dir / "driver.json").read_text())["run_id"] == driver.run_id
