"""A real sweep on this machine: Ray Tune, real trials (tiny model, vLLM, DeepSpeed, the sandbox), faults.

One sweep of 1 model x 2 contexts x 2 seeds x 2 steps runs through `opsd sweep run` as a user would start it.
While it runs, one trial's process is SIGKILLed after its first checkpoint (Tune retries it; it resumes from
the checkpoint), then the driver itself is SIGKILLed; `opsd sweep resume` finishes the sweep. Afterwards:
every trial completed, each step in the Parquet files exactly once, no process of any trial alive, the W&B
offline runs readable back, the API key never in a trial's environment, and `opsd analyze` fits the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from tests.trainer.copy_task import copy_task

OPSD = [sys.executable, "-m", "orchestrator.cli"]
SECRET = "wandb-key-that-must-not-reach-trials-0123456789"
KILLED_TRIAL = "copier-none-s0"
STEPS = 2
# Unique to this test run: the trials' processes are found by their OPSD_TRIAL=<sweep>/<trial> marker, and
# another run of these tests on the same machine must not be taken for this one's leftovers.
SWEEP = f"faults-{os.getpid()}"


def sweep_file(root: Path, model: Path, data: Path) -> Path:
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": SWEEP, "storage": str(root / "storage"),
        "models": [{"path": str(model), "label": "copier", "family": "tiny", "size_b": 0.001}],
        "contexts": ["none", "llm_peer_hints"], "seeds": [0, 1],
        "data": {"source": "jsonl", "path": str(data)},
        "resources": {"gpus": 0, "cpus": 1, "sandbox_workers": 1}, "max_concurrent_trials": 2, "max_failures": 2,
        "wandb": {"mode": "offline", "project": "opsd-test"},
        "trial": {
            "steps": STEPS, "context": {"max_teacher_prompt_tokens": 1024},
            "rollout": {"prompts_per_step": 4, "n_samples": 2, "max_response_tokens": 16, "max_prompt_tokens": 512},
            "optim": {"lr": 1.0e-3, "mini_batch_size": 4, "micro_batch_size": 4},
            "teacher": {"ema_rate": 0.0}, "eval": {"every_steps": 2, "n_samples": 1, "teacher_n_samples": 1}},
    }))
    return path


def trial_env() -> dict[str, str]:
    # A launcher's variables from other tests' torch.distributed must not reach the trials.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")}
    env["WANDB_API_KEY"] = SECRET
    return env


def marked_processes(sweep: str) -> dict[int, float]:
    """Every process whose environment carries a trial of `sweep` (the trainable marks a trial's tree)."""
    found = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("OPSD_TRIAL", "").startswith(f"{sweep}/"):
                found[p.pid] = p.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def still_alive(records: dict[int, float]) -> list[int]:
    out = []
    for pid, created in records.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def attempts(trial_dir: Path) -> list[dict]:
    path = trial_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def faulted_sweep(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    data, model = copy_task(root, tiny_model_dir)
    path = sweep_file(root, model, data)
    sweep_dir = root / "storage" / SWEEP
    trials = sweep_dir / "trials"
    seen: dict[int, float] = {}
    events: dict = {"trial_env": None}
    with open(root / "run.log", "w") as log:
        driver = subprocess.Popen([*OPSD, "sweep", "run", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                  env=trial_env(), start_new_session=True)
    deadline = time.monotonic() + 900
    killed_trial = killed_driver = False
    while driver.poll() is None and not killed_driver:
        assert time.monotonic() < deadline, (root / "run.log").read_text()[-3000:]
        seen.update(marked_processes(SWEEP))
        target = trials / KILLED_TRIAL
        if not killed_trial and (target / "checkpoints" / "step-00000001" / "trainer_state.json").is_file() \
                and not (target / "trial.json").exists():
            guard = [e for e in attempts(target) if e["event"] == "pid"][-1]["pid"]
            try:
                # `opsd trial` itself (below the guard's supervisor), as an OOM kill would hit it.
                (trial,) = [p for p in psutil.Process(guard).children(recursive=True)
                            if p.cmdline()[1:3] == ["-m", "orchestrator.cli"]]
                events["trial_env"] = trial.environ()
                trial.kill()
                killed_trial = True
            except (psutil.NoSuchProcess, ValueError):
                pass
        elif killed_trial:
            # As soon as the retried trial has resumed, the driver dies (with it, every trial it runs).
            second = target / "logs" / "attempt-2.log"
            if second.exists() and "resuming" in second.read_text():
                events["running_at_driver_kill"] = [d.name for d in trials.iterdir()
                                                    if attempts(d) and attempts(d)[-1]["event"] == "pid"]
                os.killpg(driver.pid, signal.SIGKILL)
                killed_driver = True
        time.sleep(0.2)
    driver.wait()
    assert killed_trial and killed_driver, (root / "run.log").read_text()[-3000:]
    with open(root / "resume.log", "w") as log:
        resumed = subprocess.run([*OPSD, "sweep", "resume", str(sweep_dir)], stdout=log, stderr=subprocess.STDOUT,
                                 env=trial_env(), timeout=900)
    seen.update(marked_processes(SWEEP))
    return {"root": root, "dir": sweep_dir, "resume_code": resumed.returncode, "seen": seen, **events}


def test_sweep_finishes_after_a_killed_trial_and_a_killed_driver(faulted_sweep):
    log = (faulted_sweep["root"] / "resume.log").read_text()
    assert faulted_sweep["resume_code"] == 0, log[-3000:]
    assert f"continuing sweep {SWEEP}" in log and "trials: 4 completed" in log
    trials = pd.read_parquet(faulted_sweep["dir"] / "trials.parquet")
    assert sorted(trials.trial_id) == ["copier-llm_peer_hints-s0", "copier-llm_peer_hints-s1", "copier-none-s0",
                                       "copier-none-s1"]
    assert (trials.status == "completed").all() and trials.code_version.notna().all()
    assert trials.set_index("trial_id").loc[KILLED_TRIAL, "attempts"] >= 2


def test_every_step_exactly_once(faulted_sweep):
    steps = pd.read_parquet(faulted_sweep["dir"] / "steps.parquet")
    assert not steps.duplicated(["trial_id", "step", "phase"]).any()
    for trial_id, rows in steps.groupby("trial_id"):
        assert sorted(rows[rows.phase == "train"].step) == [1, 2], trial_id
        assert sorted(rows[rows.phase == "eval"].step) == [0, 2], trial_id
    assert set(steps.context) == {"none", "llm_peer_hints"} and steps.model_family.eq("tiny").all()


def test_killed_trial_resumed_from_its_checkpoint(faulted_sweep):
    trial_dir = faulted_sweep["dir"] / "trials" / KILLED_TRIAL
    ends = [e for e in attempts(trial_dir) if e["event"] == "end"]
    assert ends[0]["exit_code"] == -signal.SIGKILL
    second = (trial_dir / "logs" / "attempt-2.log").read_text()
    assert "resuming" in second and "after step" in second


def test_no_process_of_any_trial_survives(faulted_sweep):
    assert len(faulted_sweep["seen"]) >= 4  # the trials' processes were seen while they ran
    assert still_alive(faulted_sweep["seen"]) == []
    assert marked_processes(SWEEP) == {}


def test_trials_see_no_wandb_key_and_no_gpu(faulted_sweep):
    env = faulted_sweep["trial_env"]
    assert env is not None and SECRET not in json.dumps(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OPSD_TRIAL"] == f"{SWEEP}/{KILLED_TRIAL}"


def test_wandb_offline_runs_hold_each_trials_steps(faulted_sweep):
    from tests.orchestrator.test_wandb_log import history

    runs = sorted((faulted_sweep["dir"] / "wandb").glob("offline-run-*"))
    for trial_id in ("copier-none-s0", "copier-llm_peer_hints-s1"):
        label = trial_id.replace("copier-", "")
        last_attempt = [r for r in runs if f"copier-{label}-" in r.name][-1]
        assert [row["trial_step"] for row in history(last_attempt)] == [0, 1, 2], trial_id


def test_status_and_analyze_read_the_sweep(faulted_sweep, tmp_path):
    status = subprocess.run([*OPSD, "sweep", "status", str(faulted_sweep["dir"]), "--json"], capture_output=True,
                            text=True, timeout=120)
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [r["state"] for r in rows] == ["completed"] * 4
    analyzed = subprocess.run([*OPSD, "analyze", str(faulted_sweep["dir"]), "--out", str(tmp_path / "report")],
                              capture_output=True, text=True, timeout=300)
    assert analyzed.returncode == 0, analyzed.stderr
    law = json.loads((tmp_path / "report" / "law.json").read_text())
    assert law and (tmp_path / "report" / "report.md").is_file()


def test_the_terminal_shows_our_progress_not_third_party_logs(faulted_sweep):
    out = (faulted_sweep["root"] / "resume.log").read_text()
    for noise in ("Traceback", "(pid=", "INFO ", "WARNING ", "vllm", "DeepSpeed", "Token authentication"):
        assert noise not in out, noise
    assert f"sweep {SWEEP}: 4/4 done" in out
    driver_log = (faulted_sweep["dir"] / "driver.log").read_text()
    assert driver_log  # Ray's and Tune's messages went to the driver's log file
