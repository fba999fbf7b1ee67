"""One W&B run per trial, logged by the trial's own trainable (not by a driver-side Ray callback).

Ray Tune's `WandbLoggerCallback` changes directory into node-local trial folders and can hang the driver on
upload (ray#33129, #47985); here the trainable feeds W&B the rows its trial writes to `steps.parquet`, so:
- the run id is deterministic from (sweep, model, context, seed): a retried trial continues its run online;
- offline mode cannot resume a run (wandb#2423), so each attempt is its own offline run (`-a<attempt>`) that
  carries the trial's steps from step 0: every offline run is complete on its own. A run whose attempt
  finished it (whatever the trial's outcome) gets a `FINISHED_MARK` file; the runs of attempts killed with the
  driver (no history, no exit) lack it and are set aside in `wandb/incomplete/`, out of the sync command;
- the trial's step is the x-axis (`trial_step`), not W&B's internal counter;
- W&B failing (no network, bad key, full disk) is logged in the trial's log and never fails the trial;
- `dir` is absolute, under the sweep folder; the trial's own processes never see WANDB_API_KEY.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Callable

from orchestrator.sweep_file import WandbSettings

# Seconds W&B may take to start a run before the trial goes on without it.
INIT_TIMEOUT_S = 120.0
# Written into an offline run's folder once its attempt has finished the run.
FINISHED_MARK = "opsd-finished"
# Under the sweep's W&B folder: offline runs whose attempt never finished them.
INCOMPLETE = "incomplete"


def run_id(sweep: str, model: str, context: str, seed: int, *, attempt: int | None = None) -> str:
    """A W&B run id that names the trial and cannot collide across sweeps (W&B ids allow [A-Za-z0-9_-])."""
    digest = hashlib.sha256(f"{sweep}/{model}/{context}/{seed}".encode()).hexdigest()[:8]
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{model}-{context}-s{seed}")[:48]
    return f"{base}-{digest}" + (f"-a{attempt}" if attempt is not None else "")


class TrialRun:
    """The W&B run of one trial attempt; every method is a no-op after W&B has failed once."""

    def __init__(self, settings: WandbSettings, *, sweep: str, model: str, context: str, seed: int, attempt: int,
                 config: dict[str, Any], runs_dir: Path, warn: Callable[[str], None]):
        """`runs_dir`: the folder W&B writes its runs into (`<runs_dir>/offline-run-*`), named `wandb`."""
        self.settings, self.warn = settings, warn
        self.run = None
        self.logged_step = -1
        self.offline = settings.mode == "offline"
        if settings.mode == "disabled":
            return
        if runs_dir.name != "wandb":  # wandb.init(dir=D) writes its runs into D/wandb
            raise ValueError(f"W&B runs go to a folder named wandb, not {runs_dir}")
        self.id = run_id(sweep, model, context, seed, attempt=attempt if self.offline else None)
        try:
            import wandb

            runs_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, group=sweep, job_type="opsd-trial",
                name=f"{model} {context} s{seed}", id=self.id, resume=None if self.offline else "allow",
                tags=[model, context, f"seed{seed}", *settings.tags], dir=str(runs_dir.resolve().parent),
                config={"sweep": sweep, "model_label": model, "context_name": context, "attempt": attempt, **config},
                mode=settings.mode, reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S, x_disable_stats=True))
            self.run.define_metric("trial_step")
            self.run.define_metric("*", step_metric="trial_step")
            # A resumed online run already holds the steps an earlier attempt logged.
            self.logged_step = int(self.run.summary.get("trial_step", -1)) if not self.offline else -1
        except Exception as err:  # W&B must never fail a trial
            self._fail("start", err)

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Log steps.parquet rows of steps not logged yet (both phases of a step together)."""
        if self.run is None:
            return
        try:
            by_step: dict[int, dict[str, Any]] = {}
            for row in rows:
                if row["step"] > self.logged_step:
                    by_step.setdefault(row["step"], {}).update(_prefixed(row))
            for step in sorted(by_step):
                self.run.log({"trial_step": step, **by_step[step]})
                self.logged_step = step
        except Exception as err:
            self._fail("log", err)

    def finish(self, summary: dict[str, Any] | None, *, exit_code: int) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update({k: v for k, v in summary.items() if _plain(v)})
            run_folder = Path(self.run.settings.sync_dir)
            self.run.finish(exit_code=exit_code)
            if self.offline:
                (run_folder / FINISHED_MARK).write_text(f"finished with exit code {exit_code}\n")
        except Exception as err:
            self._fail("finish", err)
        self.run = None

    def _fail(self, what: str, err: Exception) -> None:
        self.warn(f"W&B {what} failed, the trial goes on without it: {type(err).__name__}: {err}")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass


def _plain(value: Any) -> bool:
    return isinstance(value, (int, str, bool)) or (isinstance(value, float) and math.isfinite(value))


def _prefixed(row: dict[str, Any]) -> dict[str, Any]:
    phase = row.get("phase", "train")
    return {f"{phase}/{k}": v for k, v in row.items()
            if k not in ("step", "phase", "schema_version", "trial_id") and v is not None and _plain(v)}


def strip_secrets(env: dict[str, str]) -> dict[str, str]:
    """The environment of a trial's processes: W&B's key stays with the trainable that logs."""
    return {k: v for k, v in env.items() if not k.startswith("WANDB_")}


def offline_runs(runs_dir: Path) -> list[Path]:
    """The offline run folders in a sweep's W&B folder (complete or not; incomplete/ is not searched)."""
    return sorted(p for p in runs_dir.glob("offline-run-*") if p.is_dir())


def set_aside_incomplete(runs_dir: Path) -> list[Path]:
    """Move the offline runs that no attempt finished (killed with the driver or its node: no history, no exit)
    into `<runs_dir>/incomplete/`, out of the sync command's reach; returns their new folders. Call it only
    when no trial of the sweep runs (a running attempt's run is unfinished too)."""
    moved = []
    for run in offline_runs(runs_dir):
        if not (run / FINISHED_MARK).is_file():
            target = runs_dir / INCOMPLETE / run.name
            target.parent.mkdir(exist_ok=True)
            run.rename(target)
            moved.append(target)
    return moved


def sync_command(runs_dir: Path) -> str:
    """The command that uploads the sweep's offline runs (wandb 0.31: run folders as arguments)."""
    return f"wandb sync {runs_dir}/offline-run-*"
