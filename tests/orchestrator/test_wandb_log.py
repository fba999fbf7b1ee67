"""W&B runs of trials: deterministic ids, offline runs readable back, an unreachable W&B never fails a trial."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import wandb_log
from orchestrator.sweep_file import WandbSettings
from orchestrator.wandb_log import (
    FINISHED_MARK,
    TrialRun,
    offline_runs,
    run_id,
    set_aside_incomplete,
    strip_secrets,
    sync_command,
)

WANDB = str(Path(sys.executable).with_name("wandb"))


def history(run_dir: Path) -> list[dict]:
    """The logged rows of an offline run, read from its .wandb file by W&B's own tool."""
    (wandb_file,) = run_dir.glob("*.wandb")
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(wandb_file)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
    return rows


def test_run_ids_are_deterministic_per_trial_and_attempt():
    a = run_id("sweep", "qwen3-8b", "feedback", 0)
    assert a == run_id("sweep", "qwen3-8b", "feedback", 0)
    assert a != run_id("sweep", "qwen3-8b", "feedback", 1) != run_id("other", "qwen3-8b", "feedback", 0)
    assert run_id("sweep", "qwen3-8b", "feedback", 0, attempt=2) == a + "-a2"


def test_offline_run_holds_every_step_once(tmp_path):
    messages = []
    run = TrialRun(WandbSettings(mode="offline", project="p"), sweep="s", model="m", context="none", seed=0,
                   attempt=1, config={"steps": 2}, runs_dir=tmp_path / "wandb", warn=messages.append)
    rows = [{"step": 0, "phase": "eval", "student_acc": 0.25, "teacher_acc": 0.5, "gap": 0.25},
            {"step": 1, "phase": "train", "loss": 0.5, "kl": 0.4},
            {"step": 2, "phase": "train", "loss": 0.3, "kl": 0.2},
            {"step": 2, "phase": "eval", "student_acc": 0.5, "teacher_acc": 0.5, "gap": 0.0}]
    run.log_rows(rows[:2])
    run.log_rows(rows)  # rows already logged are not logged again
    run.finish({"improvement": 0.25}, exit_code=0)
    assert messages == []
    (run_dir,) = offline_runs(tmp_path / "wandb")
    logged = history(run_dir)
    assert [r["trial_step"] for r in logged] == [0, 1, 2]
    assert logged[2]["train/loss"] == 0.3 and logged[2]["eval/student_acc"] == 0.5 and logged[0]["eval/gap"] == 0.25


def test_unreachable_wandb_never_fails_the_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_log, "INIT_TIMEOUT_S", 5.0)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    messages = []
    run = TrialRun(WandbSettings(mode="online", project="p"), sweep="s", model="m", context="none", seed=0,
                   attempt=1, config={}, runs_dir=tmp_path / "wandb", warn=messages.append)
    run.log_rows([{"step": 1, "phase": "train", "loss": 0.5}])
    run.finish(None, exit_code=0)
    assert len(messages) == 1 and messages[0].startswith("W&B start failed, the trial goes on without it")


def test_disabled_wandb_writes_nothing(tmp_path):
    run = TrialRun(WandbSettings(mode="disabled"), sweep="s", model="m", context="none", seed=0, attempt=1,
                   config={}, runs_dir=tmp_path / "wandb", warn=pytest.fail)
    run.log_rows([{"step": 1, "phase": "train", "loss": 0.5}])
    run.finish(None, exit_code=0)
    assert list(tmp_path.iterdir()) == []


def test_trial_processes_never_see_the_wandb_key():
    env = strip_secrets({"WANDB_API_KEY": "k", "WANDB_MODE": "online", "HF_TOKEN": "h", "PATH": "/bin"})
    assert env == {"HF_TOKEN": "h", "PATH": "/bin"}  # the trial needs HF_TOKEN to load gated models


# An attempt killed with the driver: its run started and logged, then its process died without finishing it.
KILLED_ATTEMPT = """
import os, signal, sys
from pathlib import Path
from orchestrator.sweep_file import WandbSettings
from orchestrator.wandb_log import TrialRun
run = TrialRun(WandbSettings(mode="offline", project="p"), sweep="s", model="m", context="feedback", seed=0,
               attempt=1, config={}, runs_dir=Path(sys.argv[1]), warn=print)
run.log_rows([{"step": 0, "phase": "eval", "gap": 0.25}])
os.kill(os.getpid(), signal.SIGKILL)
"""


def finished_run(runs_dir: Path, context: str, attempt: int) -> None:
    run = TrialRun(WandbSettings(mode="offline", project="p"), sweep="s", model="m", context=context, seed=0,
                   attempt=attempt, config={}, runs_dir=runs_dir, warn=pytest.fail)
    run.log_rows([{"step": 0, "phase": "eval", "gap": 0.25}, {"step": 1, "phase": "train", "loss": 0.5}])
    run.finish(None, exit_code=1 if attempt == 1 else 0)


def test_the_printed_sync_command_is_accepted_by_the_installed_wandb_and_skips_unfinished_runs(tmp_path):
    runs_dir = tmp_path / "sweep" / "wandb"
    finished_run(runs_dir, "none", 1)  # a failed attempt's run is complete too: it has its history and exit
    finished_run(runs_dir, "none", 2)
    killed = subprocess.run([sys.executable, "-c", KILLED_ATTEMPT, str(runs_dir)], timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -9
    complete = [r for r in offline_runs(runs_dir) if (r / FINISHED_MARK).is_file()]
    assert len(complete) == 2 and len(offline_runs(runs_dir)) == 3

    (moved,) = set_aside_incomplete(runs_dir)
    assert moved.parent == runs_dir / "incomplete" and "feedback" in moved.name
    assert offline_runs(runs_dir) == complete
    command = sync_command(runs_dir)
    # The command as printed, through a shell (the glob), with wandb's --dry-run: options and paths are
    # checked by the installed wandb CLI and nothing is uploaded.
    result = subprocess.run(["bash", "-c", f"{command.replace('wandb sync', shlex.quote(WANDB) + ' sync', 1)} "
                             "--dry-run"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert "Would sync 2 run(s)" in said
    assert all(run.name in said for run in complete) and moved.name not in said
