"""The state of every trial of a sweep, read from the sweep folder alone (no Ray): `opsd sweep status` and
the live view of `opsd sweep run` show the same thing.

A trial is
- `pending` before its first attempt (or, while the driver runs, waiting for the next one after an attempt the
  driver's stop interrupted);
- `running` while an attempt has started and not ended and the driver runs;
- `interrupted` when its last attempt ended with the driver (Ctrl-C, a SLURM time limit) or the driver is gone
  (killed, its node lost) while the attempt was open: `opsd sweep resume` continues it;
- `completed` once its trial.json is written;
- `retrying` after a failed attempt while retries remain;
- `failed` when the last allowed attempt failed, or at once when an attempt exited with the configuration
  error code (a retry would fail the same way);
- `skipped`, in a guided sweep that has stopped, when its searcher never chose it.
A trial linked from another sweep (orchestrator/shared_trials.py) shows that sweep's trial, and names the
sweep.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from orchestrator.driver import DriverRecord, is_running, last_seen, read_driver
from orchestrator.errors import CONFIG_ERROR_EXIT
from orchestrator.shared_trials import linked_sweep
from orchestrator.sweep_state import (
    StepsUnreadable,
    SweepState,
    latest_metrics,
    read_guided,
    read_progress,
    read_step_rows,
)

STATES = ("completed", "failed", "running", "retrying", "interrupted", "pending", "skipped")


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
    failure: str | None = None  # the last failed attempt: how it ended, its one-line reason, its log
    host: str | None = None
    node_id: str | None = None
    linked: str | None = None  # the sweep that trained it, for a trial linked from another sweep


def trial_status(state: SweepState, trial_id: str, *, now: float | None = None,
                 driver: DriverRecord | None = None) -> TrialStatus:
    """The trial's status; `driver` is the sweep's driver record (read from the folder when not given)."""
    now = now or time.time()
    driver = driver if driver is not None else read_driver(state.dir)
    running = is_running(driver, now=now)
    # An open attempt of a driver that is gone ended at the latest when the driver was last seen.
    open_until = now if running is not False else min(now, last_seen(driver))
    files = state.trial_files(trial_id)
    attempts = files.attempts()
    progress = read_progress(files.progress)
    unreadable = None
    try:
        rows = read_step_rows(files.steps)
    except StepsUnreadable as err:
        rows, unreadable = [], str(err)
    summary = files.summary()
    steps = progress.get("steps", state.trials[trial_id].get("steps"))
    seconds = sum(max((a.get("ended") or open_until) - a["started"], 0.0) for a in attempts if "started" in a) \
        if attempts else None
    status = TrialStatus(trial_id, "pending", len(attempts), steps=steps, seconds=seconds,
                         host=attempts[-1].get("host") if attempts else None,
                         node_id=attempts[-1].get("node_id") if attempts else None,
                         linked=linked_sweep(state.links[trial_id]) if trial_id in state.links else None)
    status.last.update(latest_metrics(rows))
    status.failure = unreadable
    if summary is not None and summary.get("status", "completed") == "completed":
        status.state, status.step, status.phase = "completed", steps, None
        return status
    if not attempts:
        if state.guided is not None:
            log = read_guided(state.dir)
            if log.get("stopped") and trial_id not in {d.get("trial_id") for d in log["decisions"]}:
                status.state = "skipped"
        return status
    last = attempts[-1]
    failed = [a for a in attempts if "ended" in a and a.get("exit_code") not in (0, None)]
    if failed:
        status.failure = status.failure or _failure_line(failed[-1])
    status.step = progress.get("step")
    if "ended" not in last:
        if running is False:
            status.state = "interrupted"
            status.failure = (f"attempt {last['attempt']} was running when the driver stopped "
                              f"(last seen {clock(now - open_until)} ago on {driver.host})")
        else:
            status.state = "running"
            status.phase = progress.get("phase", "starting")
            status.remaining_s = _remaining(progress, rows)
    elif last.get("interrupted") or last.get("lost"):
        status.state = "pending" if running else "interrupted"
    elif last.get("exit_code") == CONFIG_ERROR_EXIT:
        status.state = "failed"
    else:
        status.state = "failed" if len(failed) > state.max_failures else "retrying"
    return status


def _failure_line(attempt: dict[str, Any]) -> str:
    code = attempt["exit_code"]
    how = f"exit {code}" if code >= 0 else f"killed by signal {-code}"
    if code == CONFIG_ERROR_EXIT:
        how += " (a configuration error: not retried)"
    reason = f": {attempt['reason']}" if attempt.get("reason") else ""
    return f"attempt {attempt['attempt']} {how}{reason} (log {attempt.get('log')})"


def _remaining(progress: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """Seconds left in a running trial: the median of its train steps' times (phase times summed) times the
    steps left."""
    steps, step = progress.get("steps"), progress.get("step")
    if steps is None or step is None:
        return None
    train_times = [sum(v for k, v in r.items() if k.startswith("time/") and v) for r in rows if r.get("phase") == "train"]
    if not train_times:
        return None
    return max(steps - step + 1, 0) * statistics.median(train_times)


def sweep_status(state: SweepState, *, now: float | None = None) -> list[TrialStatus]:
    now = now or time.time()
    driver = read_driver(state.dir)
    return [trial_status(state, trial_id, now=now, driver=driver) for trial_id in state.trials]


def counts(statuses: list[TrialStatus]) -> dict[str, int]:
    out = {k: 0 for k in STATES}
    for s in statuses:
        out[s.state] += 1
    return out


def unfinished(statuses: list[TrialStatus]) -> int:
    """Trials that have neither completed nor failed for good (nor been skipped by a guided sweep)."""
    return sum(1 for s in statuses if s.state not in ("completed", "failed", "skipped"))


def estimated_remaining(statuses: list[TrialStatus], concurrency: int) -> float | None:
    """Seconds left in the sweep: the running trials' own estimates, plus the waiting trials at the mean
    duration of the completed ones (before one has completed: the running ones' projected durations), spread
    over the trials that run at once. None while nothing tells how long a trial takes."""
    durations = [s.seconds for s in statuses if s.state == "completed" and s.seconds]
    running = [s for s in statuses if s.state == "running"]
    if not durations:
        durations = [s.seconds + s.remaining_s for s in running if s.seconds is not None and s.remaining_s is not None]
    waiting = sum(1 for s in statuses if s.state in ("pending", "retrying", "interrupted"))
    per_trial = sum(durations) / len(durations) if durations else None
    left = []
    for s in running:
        if s.remaining_s is not None:
            left.append(s.remaining_s)
        elif per_trial is not None:
            left.append(max(per_trial - (s.seconds or 0.0), 0.0))
        else:
            return None
    if waiting and per_trial is None:
        return None
    return max(left, default=0.0) + (per_trial or 0.0) * waiting / max(concurrency, 1)


def driver_line(state: SweepState, statuses: list[TrialStatus], *, now: float | None = None) -> str | None:
    """One line on the sweep's driver for `opsd sweep status`: where it runs, or that it is gone and how to
    continue. None for a folder without a driver record."""
    now = now or time.time()
    driver = read_driver(state.dir)
    if driver is None:
        return None
    where = state.remote or state.dir
    if is_running(driver, now=now):
        return (f"driver: running on {driver.host} (pid {driver.pid}) for {clock(now - driver.started)}, "
                f"heartbeat {clock(now - driver.updated)} ago")
    left = unfinished(statuses)
    if driver.ended is not None:
        how = f"ended ({driver.outcome}) {clock(now - driver.ended)} ago"
    else:
        how = f"killed or lost: last seen {clock(now - driver.updated)} ago on {driver.host}"
    line = f"driver not running: {how}"
    if left:
        line += f"; {left} trial(s) unfinished: `opsd sweep resume {where}` continues the sweep"
    return line


def clock(seconds: float | None) -> str:
    """Seconds as H:MM:SS ("-" for None)."""
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_STYLE = {"completed": "green", "running": "cyan", "retrying": "yellow", "failed": "red", "pending": "dim",
          "interrupted": "magenta", "skipped": "dim"}
# Phases as the table shows them (trainer/records.py `Progress` names them); at most 11 characters.
_PHASES = {"setup": "setup", "resume": "resume", "initial_eval": "eval", "rollout": "rollout", "sandbox": "grading",
           "teacher_context": "contexts", "rollout_gather": "gather", "old_logps": "old logps",
           "teacher_forward": "teacher fwd", "student_forward_backward": "student f+b", "optimizer": "optimizer", "weight_push": "weight push",
           "ema_update": "ema update", "eval": "eval", "checkpoint": "checkpoint", "starting": "starting"}
# Columns from the first to go when the terminal is narrow to the last; trial and state always stay.
_DROP_ORDER = ("node", "kl", "teacher", "loss", "time", "student", "phase", "gap", "left", "step")
_LEFT = ("trial", "state", "phase", "node")


def status_table(state: SweepState, statuses: list[TrialStatus], *, elapsed: float | None = None,
                 concurrency: int = 1, width: int | None = None) -> Table:
    """One row per trial; with `width` (the terminal's columns) the columns that do not fit are left out,
    least useful first (node, KL, teacher accuracy, loss, ...)."""
    n = counts(statuses)
    title = f"sweep {state.name}: {n['completed']}/{len(statuses)} done" + "".join(
        f", {n[k]} {k}" for k in ("running", "pending", "retrying", "interrupted", "failed", "skipped") if n[k])
    if elapsed is not None:
        remaining = estimated_remaining(statuses, concurrency)
        title += f" | elapsed {clock(elapsed)}, " + (
            f"remaining ~{clock(remaining)}" if remaining is not None else "remaining: known after a step")
    hosts: dict[str, set[str]] = {}
    for s in statuses:
        if s.host:
            hosts.setdefault(s.host, set()).add(s.node_id or "")

    def node(s: TrialStatus) -> str:
        # Two Ray nodes on one host (a test cluster, containers) read alike by host name: add the node id.
        if not s.host:
            return "-"
        return f"{s.host}:{(s.node_id or '?')[:6]}" if len(hosts[s.host]) > 1 else s.host

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    columns: dict[str, list[Any]] = {name: [] for name in (
        "trial", "state", "step", "phase", "time", "left", "loss", "kl", "student", "teacher", "gap", "node")}
    for s in statuses:
        cells = {
            "trial": s.trial_id,
            "state": Text(s.state + (f" #{s.attempts}" if s.attempts > 1 else "")
                          + (f" (in {s.linked})" if s.linked else ""), style=_STYLE[s.state]),
            "step": "-" if s.step is None else f"{s.step}/{s.steps}",
            "phase": _PHASES.get(s.phase, s.phase) if s.phase else "-",
            "time": clock(s.seconds), "left": clock(s.remaining_s),
            "loss": num(s.last.get("train/loss"), ".4f"), "kl": num(s.last.get("train/kl"), ".4f"),
            "student": num(s.last.get("eval/student_acc"), ".3f"), "teacher": num(s.last.get("eval/teacher_acc"), ".3f"),
            "gap": num(s.last.get("eval/gap"), "+.3f"), "node": node(s)}
        for name, cell in cells.items():
            columns[name].append(cell)
    shown = list(columns)
    if width is not None:
        def needed(names: list[str]) -> int:  # rich's default box: 1 border + 2 padding per column, 1 border
            return sum(max(cell_len(c), *(cell_len(v.plain if isinstance(v, Text) else v) for v in columns[c]))
                       + 3 for c in names) + 1
        for name in _DROP_ORDER:
            if needed(shown) <= width:
                break
            shown.remove(name)
    from rich.markup import escape

    # Escaped: a decision's reason and its intervals hold brackets, which rich would read as markup.
    caption = escape("\n".join(guided_lines(state))) if state.guided is not None else None
    table = Table(title=title, title_justify="left", expand=False, caption=caption, caption_justify="left")
    for name in shown:
        # The trial id folds onto a second line rather than push the table past the terminal's width.
        table.add_column(name, justify="left" if name in _LEFT else "right", no_wrap=name != "trial",
                         overflow="fold" if name == "trial" else "ellipsis", max_width=11 if name == "phase" else None)
    for i in range(len(statuses)):
        table.add_row(*(columns[name][i] for name in shown))
    return table


def guided_lines(state: SweepState) -> list[str]:
    """What a guided sweep's searcher did: its goal and budget, the screen, its last decision, why it stopped."""
    import json

    settings = state.guided["settings"]
    goal = (f"goal law (slope interval expected narrower than {settings['slope_ci_width']:g})"
            if settings["goal"] == "law"
            else "goal best (stop when no untrained configuration can beat the best measured)")
    budget = [f"{settings['max_trials']} trials" if settings.get("max_trials") else None,
              f"{settings['max_hours']:g} device-hours" if settings.get("max_hours") else None]
    lines = [f"guided: {goal}" + (f", at most {' and '.join(b for b in budget if b)}" if any(budget) else "")]
    screen = state.dir / "screen" / "screen.json"
    if screen.is_file():
        rows = json.loads(screen.read_text())["rows"]
        gaps = ", ".join(f"{r['model_label']}/{r['context']} {r['initial_gap']:+.3f}" for r in rows)
        lines.append(f"screen: {len(rows)} configurations, initial gap {gaps} ({screen})")
    else:
        lines.append("screen: not measured yet (it runs before the first trial)")
    log = read_guided(state.dir)
    trained = [d for d in log["decisions"] if d["action"] == "train"]
    if trained:
        last = trained[-1]
        p = last.get("prediction")
        predicted = (f"; predicted {p['predicted_improvement']:+.3f} [{p['pi_lo']:+.3f}, {p['pi_hi']:+.3f}]" if p
                     else "; no prediction yet (no line)")
        lines.append(f"decision {last['n']}: {last['reason']}{predicted}")
        def fit(family: str, v: dict) -> str:
            ci = f" [{v['slope_ci'][0]:.3g}, {v['slope_ci'][1]:.3g}]" if v.get("slope_ci") else ""
            expected = (f", interval expected {v['expected_width']:.3g} wide" if v.get("expected_width") is not None
                        else "")
            return f"{family}: slope {v['slope']:.3g}{ci} on {v['n_configs']} configurations{expected}"
        fits = "; ".join(fit(f, v) for f, v in (log["decisions"][-1].get("fits") or {}).items())
        if fits:
            lines.append(f"law so far: {fits}")
    if log.get("stopped"):
        lines.append(f"stopped after {len(trained)} trials: {log['stopped']}")
    return lines
