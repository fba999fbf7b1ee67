"""The state of every trial of a sweep, read from the sweep folder alone (no Ray): `opsd sweep status` and
the live view of `opsd sweep run` show the same thing.

A trial is `pending` before its first attempt, `running` while an attempt has started and not ended,
`completed` once its trial.json is written, `retrying` after a failed attempt while retries remain, and
`failed` when the last allowed attempt failed. A trial linked from another sweep (orchestrator/shared_trials.py)
shows that sweep's trial, and names the sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from orchestrator.shared_trials import linked_sweep
from orchestrator.sweep_state import SweepState, TrialFiles, latest_metrics, read_progress, read_step_rows


@dataclass
class TrialStatus:
    trial_id: str
    state: str
    attempts: int
    step: int | None = None
    steps: int | None = None
    phase: str | None = None
    seconds: float | None = None  # wall time of the trial so far (all attempts)
    remaining_s: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # latest train and eval metrics
    failure: str | None = None
    host: str | None = None
    linked: str | None = None  # the sweep that trained it, for a trial linked from another sweep


def trial_status(state: SweepState, trial_id: str, *, now: float | None = None) -> TrialStatus:
    now = now or time.time()
    files: TrialFiles = state.trial_files(trial_id)
    attempts = files.attempts()
    progress = read_progress(files.progress)
    rows = read_step_rows(files.steps)
    summary = files.summary()
    steps = progress.get("steps", state.trials[trial_id].get("steps"))
    seconds = sum((a.get("ended") or now) - a["started"] for a in attempts if "started" in a) if attempts else None
    status = TrialStatus(trial_id, "pending", len(attempts), steps=steps, seconds=seconds,
                         host=attempts[-1].get("host") if attempts else None,
                         linked=linked_sweep(state.links[trial_id]) if trial_id in state.links else None)
    status.last.update(latest_metrics(rows))
    if summary is not None and summary.get("status", "completed") == "completed":
        status.state, status.step, status.phase = "completed", steps, None
        return status
    if not attempts:
        return status
    last = attempts[-1]
    failed = [a for a in attempts if "ended" in a and a.get("exit_code") != 0]
    if failed:
        how = "lost (its driver or node died)" if failed[-1].get("lost") else f"exit {failed[-1]['exit_code']}"
        status.failure = f"attempt {failed[-1]['attempt']} {how} ({failed[-1].get('log')})"
    if "ended" not in last:
        status.state = "running"
        status.step, status.phase = progress.get("step"), progress.get("phase", "starting")
        status.remaining_s = _remaining(progress, rows, now)
    else:  # ended without a trial.json: an exit code other than 0, or killed
        status.state = "failed" if len(attempts) > state.max_failures else "retrying"
        status.step = progress.get("step")
    return status


def _remaining(progress: dict[str, Any], rows: list[dict[str, Any]], now: float) -> float | None:
    """Seconds left in a running trial: its mean step time in this attempt times the steps left."""
    steps, step, started = progress.get("steps"), progress.get("step"), progress.get("started")
    if steps is None or step is None or started is None:
        return None
    train_times = [sum(v for k, v in r.items() if k.startswith("time/") and v) for r in rows if r.get("phase") == "train"]
    if not train_times:
        return None
    per_step = sorted(train_times)[len(train_times) // 2]
    return max(steps - step + 1, 0) * per_step


def sweep_status(state: SweepState) -> list[TrialStatus]:
    return [trial_status(state, trial_id) for trial_id in state.trials]


def counts(statuses: list[TrialStatus]) -> dict[str, int]:
    out = {k: 0 for k in ("pending", "running", "retrying", "completed", "failed")}
    for s in statuses:
        out[s.state] += 1
    return out


def estimated_remaining(statuses: list[TrialStatus], concurrency: int) -> float | None:
    """Seconds left in the sweep: running trials' own estimates, plus the waiting trials at the mean
    duration of the completed ones, spread over the trials that run at once."""
    done = [s.seconds for s in statuses if s.state == "completed" and s.seconds]
    waiting = sum(1 for s in statuses if s.state in ("pending", "retrying"))
    running = [s.remaining_s for s in statuses if s.state == "running"]
    if waiting and not done:
        return None
    per_trial = sum(done) / len(done) if done else 0.0
    longest_running = max((r for r in running if r is not None), default=0.0)
    return longest_running + per_trial * waiting / max(concurrency, 1)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_STYLE = {"completed": "green", "running": "cyan", "retrying": "yellow", "failed": "red", "pending": "dim"}


def status_table(state: SweepState, statuses: list[TrialStatus], *, elapsed: float | None = None,
                 concurrency: int = 1) -> Table:
    n = counts(statuses)
    title = (f"sweep {state.name}: {n['completed']}/{len(statuses)} done, {n['running']} running, "
             f"{n['pending']} pending, {n['retrying']} retrying, {n['failed']} failed")
    if elapsed is not None:
        title += f" | elapsed {_clock(elapsed)}, remaining ~{_clock(estimated_remaining(statuses, concurrency))}"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("trial", "state", "step", "phase", "time", "left", "loss", "kl", "student", "teacher", "gap", "node"):
        table.add_column(column, justify="right" if column not in ("trial", "state", "phase", "node") else "left",
                         no_wrap=True)

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for s in statuses:
        step = "-" if s.step is None else f"{s.step}/{s.steps}"
        table.add_row(s.trial_id, Text(s.state + (f" #{s.attempts}" if s.attempts > 1 else "")
                                       + (f" (in {s.linked})" if s.linked else ""), style=_STYLE[s.state]),
                      step, s.phase or "-", _clock(s.seconds), _clock(s.remaining_s),
                      num(s.last.get("train/loss"), ".4f"), num(s.last.get("train/kl"), ".4f"),
                      num(s.last.get("eval/student_acc"), ".3f"), num(s.last.get("eval/teacher_acc"), ".3f"),
                      num(s.last.get("eval/gap"), "+.3f"), s.host or "-")
    return table
