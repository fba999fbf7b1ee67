"""The Ray Tune trainable: one grid point of a sweep, run as `opsd trial` in a child process it watches.

The trainable holds the trial's placement-group bundle (GPUs, CPUs) for the trial's whole life; everything the
trial starts (DeepSpeed ranks, the vLLM engine with its multiprocessing backend, sandbox workers) is a local
process below its child, never a Ray task or placement group of its own (nested placement groups outlive a
failed attempt and hang the retry: ray#25239). Per attempt it:
1. kills whatever an earlier attempt of the same trial left running (orchestrator/trial_process.py);
2. pins the trial to exactly its own GPUs (Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset for a bundle without
   GPUs, which would show a trial every GPU of the node: ray#54928);
3. runs the trial, which resumes from its own checkpoint in the sweep's storage (Tune's trial folder is
   node-local, so a retry on another node would not find it there);
4. while it runs, reports its step and phase to Tune (the driver's live view) and its new step rows to W&B;
5. records how the attempt ended (exit code and a one-line reason) and raises TrialFailed when the child did
   not finish, so Tune's FailureConfig retries it. An attempt that exited with the configuration error code
   would fail the same way again: Tune's retries within the same driver run end at once, without starting
   anything; the next `opsd sweep resume` (after the user fixed the file) tries it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from orchestrator.driver import DRIVER_FILE, read_driver
from orchestrator.errors import CONFIG_ERROR_EXIT, TrialFailed
from orchestrator.remote import RemoteSweep, mirror_dir
from orchestrator.sweep_file import CheckpointRetention
from orchestrator.sweep_state import StepsUnreadable, SweepState, latest_metrics, read_progress, read_step_rows
from orchestrator.trial_process import TrialProcess, trial_command
from orchestrator.wandb_log import TrialRun, strip_secrets
from trainer.layout import list_checkpoints
from trainer.records import error_line

POLL_S = 2.0


def train_grid_point(config: dict[str, Any]) -> None:
    """Tune's function trainable: `config` is {"sweep_dir": ..., "trial_id": ...}."""
    import ray
    from ray import tune

    trial_id = config["trial_id"]
    remote = None
    if config.get("sweep_uri"):  # remote storage: this node works in its own mirror of the trial's folder
        remote = RemoteSweep(config["sweep_uri"], mirror_dir(config["sweep_uri"], "trials"))
        remote.pull("sweep.json")
        remote.pull(DRIVER_FILE)
        remote.pull_trial(f"trials/{trial_id}")
        state = SweepState.read(remote.local)
    else:
        state = SweepState.read(Path(config["sweep_dir"]))
    point = state.trials[trial_id]
    if trial_id in state.links:  # completed by another sweep after this one's Tune grid was made: not run again
        tune.report({"status": "completed", "linked": state.links[trial_id]})
        return
    files = state.trial_files(trial_id)
    sync = _Sync(remote, f"trials/{trial_id}")
    for earlier in files.attempts():
        if "ended" not in earlier:  # its trainable died with the driver or its node: no end was written
            files.append_attempt({"attempt": earlier["attempt"], "event": "end", "time": time.time(),
                                  "exit_code": None, "lost": True})
    driver = read_driver(state.dir)
    driver_run = driver.run_id if driver is not None else None
    last = (files.attempts() or [{}])[-1]
    if last.get("exit_code") == CONFIG_ERROR_EXIT and driver_run is not None and last.get("driver_run") == driver_run:
        raise TrialFailed(f"trial {trial_id}: attempt {last['attempt']} stopped on a configuration error, which a "
                          f"retry would repeat: {last.get('reason')}")
    attempt = len(files.attempts()) + 1

    if (files.summary() or {}).get("status") == "completed":
        # The trial finished, but its trainable died (with the driver) before it had logged everything: W&B
        # gets the whole trial once more (offline, a run of its own), and Tune the final report.
        rows = _rows_reader(files.steps, lambda message: None)()
        finisher = TrialRun(state.wandb, sweep=state.name, model=point["model"], context=point["context"],
                            seed=point["seed"], attempt=attempt, config=yaml.safe_load(files.trial_file.read_text()),
                            runs_dir=state.wandb_dir, warn=lambda message: None)
        finisher.log_rows(rows)
        finisher.finish(files.summary(), exit_code=0)
        sync.push_wandb(state.wandb_dir)
        tune.report({**live_metrics(read_progress(files.progress), rows, attempt=attempt - 1), "status": "completed"})
        return
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if len(gpu_ids) != state.resources.gpus:
        raise TrialFailed(f"trial {trial_id} holds GPUs {gpu_ids} but needs {state.resources.gpus}")
    env = strip_secrets(dict(os.environ))
    env.update(CUDA_VISIBLE_DEVICES=",".join(gpu_ids), PYTHONUNBUFFERED="1", OPSD_TRIAL=f"{state.name}/{trial_id}",
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    # Ray sets these for its worker; the trial is an ordinary process tree, not a Ray worker, with its own CPUs.
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = str(state.resources.cpus)
    log_path = files.log(attempt)
    started = time.time()
    files.append_attempt({"attempt": attempt, "event": "start", "time": started, "host": socket.gethostname(),
                          "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": gpu_ids,
                          "cuda_visible_devices": env["CUDA_VISIBLE_DEVICES"], "log": str(log_path),
                          "driver_run": driver_run})

    def warn(message: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"[opsd sweep] {message}\n")

    wandb_run = TrialRun(state.wandb, sweep=state.name, model=point["model"], context=point["context"],
                         seed=point["seed"], attempt=attempt, config=yaml.safe_load(files.trial_file.read_text()),
                         runs_dir=state.wandb_dir, warn=warn)
    last_reported: tuple | None = None
    code: int | None = None
    rows_of = _rows_reader(files.steps, warn)
    stopped_by: BaseException | None = None
    try:
        with TrialProcess(trial_command(files.trial_file, files.dir), env=env, log_path=log_path,
                          record_path=files.processes, cwd=files.dir, marker=env["OPSD_TRIAL"], warn=warn) as proc:
            files.append_attempt({"attempt": attempt, "event": "pid", "pid": proc.pid, "time": time.time()})
            while True:
                code = proc.poll()
                rows = rows_of()
                wandb_run.log_rows(rows)
                report = live_metrics(read_progress(files.progress), rows, attempt=attempt)
                key = (report.get("step"), report.get("phase"), report.get("status"))
                if key != last_reported and code is None:
                    tune.report(report)
                    last_reported = key
                    sync.push(force=True)
                if code is not None:
                    break
                prune_checkpoints(files.checkpoints, keep_last=state.checkpoints.keep_last)
                sync.push()
                time.sleep(POLL_S)
            code = proc.stop()
    except BaseException as err:
        stopped_by = err
        raise
    finally:
        summary = files.summary() if code == 0 else None
        wandb_run.finish(summary, exit_code=0 if code == 0 else 1)
        end = {"attempt": attempt, "event": "end", "time": time.time(), "exit_code": code,
               "seconds": round(time.time() - started, 1)}
        if code is None and isinstance(stopped_by, (SystemExit, KeyboardInterrupt)):
            # Tune stops the trial (Ctrl-C, SIGUSR1): its session ends the trainable with SystemExit; the
            # trial's processes were stopped on the way out of TrialProcess. Not a failure of the trial.
            end.update(interrupted=True, reason="stopped with the sweep")
        elif code != 0:
            end["reason"] = attempt_reason(code, progress=read_progress(files.progress), log=log_path,
                                           started=started) or (error_line(stopped_by) if stopped_by else None)
        files.append_attempt(end)
        if code != 0:
            sync.push(force=True)
            sync.push_wandb(state.wandb_dir)
    if code != 0:
        tail = _tail(log_path)
        raise TrialFailed(f"trial {trial_id} attempt {attempt} exited with code {code}; log {log_path}\n{tail}")
    retain_when_done(files.checkpoints, state.checkpoints)
    sync.push(force=True)
    sync.push_wandb(state.wandb_dir)
    tune.report({**live_metrics(read_progress(files.progress), rows_of(), attempt=attempt),
                 "status": "completed", **{k: summary[k] for k in ("initial_gap", "improvement") if summary}})


class _Sync:
    """Pushes a trial's folder to remote storage: when its step or phase changes, else at most every minute."""

    def __init__(self, remote: RemoteSweep | None, trial_dir: str):
        self.remote, self.trial_dir, self.last = remote, trial_dir, 0.0

    def push(self, *, force: bool = False) -> None:
        if self.remote is None or (not force and time.monotonic() - self.last < 60):
            return
        self.remote.push(self.trial_dir)
        self.remote.delete_checkpoints_pruned_locally(self.trial_dir)
        self.last = time.monotonic()

    def push_wandb(self, runs_dir: Path) -> None:
        if self.remote is not None and runs_dir.is_dir():
            self.remote.push(runs_dir.name)


def live_metrics(progress: dict[str, Any], rows: list[dict[str, Any]], *, attempt: int) -> dict[str, Any]:
    """What the driver's live view shows: step k of n, phase, latest train and eval metrics."""
    out: dict[str, Any] = {"attempt": attempt, "step": progress.get("step", 0), "steps": progress.get("steps"),
                           "phase": progress.get("phase", "starting"), "status": progress.get("status", "starting"),
                           "phase_started": progress.get("phase_started"), "attempt_started": progress.get("started")}
    return {**out, **latest_metrics(rows)}


def prune_checkpoints(root: Path, *, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (the trial itself keeps two)."""
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def retain_when_done(root: Path, retention: CheckpointRetention) -> None:
    """Apply the sweep's retention to a finished trial's checkpoints."""
    if not root.is_dir() or retention.when_done == "full":
        return
    if retention.when_done == "none":
        shutil.rmtree(root, ignore_errors=True)
        return
    prune_checkpoints(root, keep_last=1)
    for last in root.glob("step-*"):
        strip_optimizer_state(last)


def strip_optimizer_state(checkpoint: Path) -> None:
    """Drop the optimizer's state (2x the weights for Adam) from a checkpoint; the weights stay loadable."""
    import torch

    for path in checkpoint.rglob("*optim_states.pt"):  # ZeRO 1-3 keep Adam's moments in their own files
        path.unlink()
    for path in checkpoint.rglob("*model_states.pt"):  # ZeRO 0 keeps them beside the weights
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("optimizer") is not None:
            state["optimizer"] = None
            torch.save(state, path)
    (checkpoint / "WEIGHTS_ONLY").write_text("optimizer state removed when the trial finished; not resumable\n")


def _rows_reader(steps: Path, warn: Callable[[str], None]) -> Callable[[], list[dict[str, Any]]]:
    """Reads the trial's step rows for W&B and the live view; a damaged file is said once in the trial's log
    (and refused by `opsd sweep collect`), and reads as no rows here rather than failing the trial."""
    said = []

    def rows() -> list[dict[str, Any]]:
        try:
            return read_step_rows(steps)
        except StepsUnreadable as err:
            if not said:
                warn(str(err))
                said.append(True)
            return []
    return rows


# The last line `opsd` prints for bad input, and the last line of a Python traceback.
_CLI_ERROR = re.compile(r"^opsd \w+: error: (.+)$")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*)$")


def attempt_reason(code: int | None, *, progress: dict[str, Any], log: Path, started: float, limit: int = 300) -> str | None:
    """One line saying why an attempt ended with `code`: the trial's own error (progress.json, when written by
    this attempt), else the error `opsd` printed last in the attempt's log, else the signal that killed it."""
    if progress.get("status") == "failed" and progress.get("error") and progress.get("updated", 0) >= started:
        return str(progress["error"])[:limit]
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for pattern in (_CLI_ERROR, _EXCEPTION):
        for line in reversed(lines):
            match = pattern.match(line)
            if match:
                return match.group(1)[:limit]
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (the kernel's OOM killer sends it when memory runs out)"
                                       if -code == signal.SIGKILL else "")
    return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
